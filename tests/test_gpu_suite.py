"""The GPU suite's dry run (``benchmarks/gpu/run.sh OUT --dry-run``): the same stages on CPU at tiny shapes,
so the command a lent GPU gets does not rot between the rare runs that have one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

STAGES = ["install", "env", "tests", "speed_w4a16"]


def test_dry_run_writes_a_complete_summary(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), str(tmp_path), "--dry-run"],
                          cwd=REPO, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == STAGES
    assert stages["install"]["status"] == "skipped"  # nothing to install where the dependencies are
    assert all(stages[name]["status"] == "ok" for name in STAGES[1:]), stages
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["summary.json", *(f"{name}.log" for name in STAGES[1:])]
    ), "one log per stage run, and few files: the device tool returns at most eight"
    assert summary["budget_s"]["total"] < 8 * 60
    assert {"torch", "lightning", "transformers", "jsonargparse", "compressed-tensors"} <= summary["versions"].keys()
    assert summary["device"]["torch"] and summary["device"]["cuda_available"] is False
    # the GPU tests are collected (all of them import) and skip without CUDA
    cases = summary["tests"]["cases"]
    assert len(cases) >= 6 and {case["outcome"] for case in cases} == {"skipped"}
    figures = summary["speed"]["W4A16"]  # the shipped recipe's path, at the tiny shape on CPU
    assert figures["recipe"] == "configs/w4a16.yaml" and figures["shape"] == "tiny"
    assert figures["step_s"] > 0 and figures["total_min"] > figures["calibration_min"] > 0
    assert figures["window_work_over_forward"] > 0 and figures["peak_gpu_gib"] is None
    assert figures["stages_s"]["gptq_start"] > 0 and figures["stages_s"]["teacher_caching"] > 0
    assert figures["autoround"]["status"] == "skipped" and figures["cbq_over_autoround"] is None
