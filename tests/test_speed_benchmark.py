"""The speed benchmark runs end to end on CPU at a tiny shape and writes a complete record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_speed_benchmark_on_cpu(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("speed_benchmark", REPO / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--shape", "tiny", "--device", "cpu", "--seqlen", "32", "--batch", "2", "--steps", "3",
            "--scheme", "W4A4", "--output", str(tmp_path)]
    assert module.main(argv) == 0
    result = json.loads((tmp_path / "speed_tiny_w4a4_cpu.json").read_text())
    assert result["measured_steps"] == 3 and result["step_s"] > 0
    assert result["projected"]["steps_per_window"] == 20 * 128 // 2
    assert result["projected"]["windows"] == 3
    window = result["projected"]["window_s"]
    assert window >= result["projected"]["steps_per_window"] * result["step_s"]
    assert 0 <= result["trainer_overhead_share"] < 1
    assert result["peak_gpu_gib"] is None and result["peak_rss_gib"] > 0
