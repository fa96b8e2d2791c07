"""DDP over calibration shards: two CPU processes (gloo) against one process on the same samples.

With contiguous batches (``advanced.train.shuffle false``) and interleaved shards, the union of the two ranks'
batches of 2 is the single process's batch of 4, and DDP averages the two ranks' gradients - so both runs
take the same optimisation steps up to the per-batch loss normalisation (each rank normalises its MSE by
its own half batch) and float summation order. Tolerance: at least 99.5 % of the integer codes identical
(measured: 99.90 %), scales within 0.2 % relative (measured: 0.023 % at most).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cbq_lightning.config import validate
from cbq_lightning.distributed import compute_device, placement
from cbq_lightning.errors import ConfigError
from cbq_lightning.export.quant_state import load_quant_state
from tests.conftest import REPO, TINY_RECIPE, load_recipe

# The mechanics under test: two ranks of 2 samples per step must compute what one process does with 4. With the
# loss as plain means (loss.normalize false: no per-batch division by the target's mean square, which would make
# a 2-sample and a 4-sample batch genuinely different objectives) the averaged gradient of the two ranks equals
# the single process's in real arithmetic, so what may differ is float32 reduction order alone: the codes must
# be identical and every float within a float32 tolerance. The soft forward (the paper's) keeps a decision
# from flipping on such noise during training.
COMMON = ["--train.epochs", "2", "--advanced.train.shuffle", "false", "--advanced.trainer.enable_progress_bar", "false",
          "--trainer.accelerator", "cpu", "--eval.datasets", "[]", "--advanced.monitor.rtn_reference", "false",
          "--extensions.rounding_forward", "soft", "--loss.normalize", "false",
          # unnormalised, a soft window's first loss (its weights start at the FP weights) is near zero, so the
          # guard's "exploded past 1000x the first loss" would fire on ordinary training (it has its own tests)
          "--advanced.guard.explode_factor", "1e12"]
#: float32 reduction-order noise, with room: about 100 units in the last place of float32
FLOAT32_NOISE = 1e-5


def _cbq(out: Path, *flags: str) -> dict:
    command = [sys.executable, "-m", "cbq_lightning.cli", "quantize", "--config", str(TINY_RECIPE),
               "--output_dir", str(out), *COMMON, *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    # every rank ends cleanly (rank 1 used to raise KeyError: 'final_error' in the CLI after its windows)
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path, dict]:
    ddp = tmp_path_factory.mktemp("ddp")
    single = tmp_path_factory.mktemp("single")
    ddp_report = _cbq(ddp, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--train.batch_size", "2")
    single_report = _cbq(single, "--trainer.devices", "1", "--train.batch_size", "4")
    return ddp, ddp_report, single, single_report


def test_shards_are_disjoint_and_cover_the_samples(runs) -> None:
    _, report, _, single = runs
    distributed = report["distributed"]
    assert distributed["world_size"] == 2
    shards = sorted(distributed["shards"], key=lambda s: s["rank"])
    assert [s["rank"] for s in shards] == [0, 1]
    first, second = (set(s["samples"]) for s in shards)
    assert not first & second
    assert first | second == set(range(report["calibration"]["num_samples"]))
    assert [s["cached_rows"] for s in shards] == [8, 8], "each rank caches only its shard"
    assert single["distributed"] == {"world_size": 1, "shards": [{"rank": 0, "samples": list(range(16)),
                                                                    "cached_rows": 16}]}


def test_two_ranks_match_one_process(runs) -> None:
    ddp, ddp_report, single, single_report = runs
    assert [w["steps"] for w in ddp_report["windows"]] == [w["steps"] for w in single_report["windows"]] == [8, 8, 8]
    a = load_quant_state(ddp / "quant_state.safetensors")
    b = load_quant_state(single / "quant_state.safetensors")
    assert a.keys() == b.keys()
    # training moved decisions away from round-to-nearest in every window: identical codes are evidence
    assert all(w["flip_fraction"] and w["fallback"] is None for w in single_report["windows"])
    for key in a:
        assert torch.equal(a[key]["qweight"], b[key]["qweight"]), key
        torch.testing.assert_close(a[key]["scales"], b[key]["scales"], rtol=FLOAT32_NOISE, atol=0)
    for mine, theirs in zip(ddp_report["block_errors"], single_report["block_errors"], strict=True):
        assert mine["quantized"] == pytest.approx(theirs["quantized"], rel=FLOAT32_NOISE)


def test_samples_must_split_evenly() -> None:
    config = load_recipe(TINY_RECIPE, "--trainer.devices", "3", "--trainer.strategy", "ddp")
    with pytest.raises(ConfigError, match="num_samples=16 does not split evenly over 3"):
        validate(config)


def test_each_process_computes_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one device picker: the launcher's LOCAL_RANK is the process's GPU (the device Lightning's DDP strategy
    gives it), so the work outside the fits (FP reference, CFP, caches) runs where the fits run, not all on
    cuda:0; without CUDA, or with accelerator cpu, every process computes on the CPU."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    place = placement("ddp", 2, 2)
    assert (place.rank, place.world, place.local_rank) == (3, 4, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device("gpu", place) == torch.device("cuda", 1)
    assert compute_device("auto", place) == torch.device("cuda", 1)
    assert compute_device("cpu", place) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device("auto", place) == torch.device("cpu")


def test_ddp_run_killed_mid_way_resumes_bit_for_bit(tmp_path: Path, runs) -> None:
    """SIGKILL both ranks once the first window's checkpoint exists; the rerun resumes and matches."""
    ddp, _, _, _ = runs
    flags = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--train.batch_size", "2"]
    command = [sys.executable, "-m", "cbq_lightning.cli", "quantize", "--config", str(TINY_RECIPE),
               "--output_dir", str(tmp_path), *COMMON, *flags]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    checkpoints = tmp_path / "checkpoints"

    def complete() -> bool:  # window 0's state (rank 0) and cache shard (rank 1) are both on disk
        return (checkpoints / "state_w0000.safetensors").exists() and (
            checkpoints / "caches_rank_1_w0000.safetensors").exists()

    deadline = time.monotonic() + 600
    while not complete() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the rank it started
    process.wait()
    assert complete(), "the run ended before its first checkpoint"
    report = _cbq(tmp_path, *flags)
    assert report["resumed_after_window"] is not None and report["resumed_after_window"] >= 0
    expected = load_quant_state(ddp / "quant_state.safetensors")
    resumed = load_quant_state(tmp_path / "quant_state.safetensors")
    for name in expected:
        for field in ("qweight", "scales", "zeros"):
            assert torch.equal(expected[name][field], resumed[name][field]), (name, field)
