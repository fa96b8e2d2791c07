"""Faults during a run lose nothing: SIGKILL anywhere, SIGTERM, a write that dies half-way, a full disk.

Each scenario ends with the same command run again, whose quantization state must equal an uninterrupted
run's bit for bit (the tiny recipe, one process, the same flags). SIGKILL and SIGTERM hit real subprocesses
of the real CLI; the half-written file and the full disk are injected into the writers (the platform gives
no portable size-limited folder), which is where a real kill or ENOSPC would strike.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbq_lightning.cli import main
from cbq_lightning.lock import LOCK_FILE
from tests.conftest import REPO, TINY_RECIPE

#: 2 epochs per window (the recipe's 10 add nothing a fault could hit: the writes and the resume points are the same)
FLAGS = ["--train.epochs", "2", "--advanced.trainer.enable_progress_bar", "false", "--eval.max_windows", "1",
         "--advanced.monitor.rtn_reference", "false"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cbq_lightning.cli", "quantize", "--config", str(TINY_RECIPE),
            "--output_dir", str(out), *FLAGS, *extra]


def _state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "quant_state.safetensors"))


def _assert_same_state(expected: Path, actual: Path) -> None:
    reference, resumed = _state(expected), _state(actual)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(_command(out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _start_and_wait_for(out: Path, marker: str) -> subprocess.Popen:
    """Start the run and return once ``out/marker`` exists (the run still going)."""
    process = subprocess.Popen(_command(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / marker).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (out / marker).exists(), f"the run ended before {marker} appeared"
    return process


@pytest.mark.parametrize("marker", [
    "checkpoints/state_w0000.safetensors",  # during window 2 (window 1 saved)
    "checkpoints/state_w0001.safetensors",  # during window 3
    "quant_state.safetensors",  # while the final outputs are written
])
def test_sigkill_anywhere_then_the_same_command_gives_the_uninterrupted_result(
    tmp_path: Path, uninterrupted: Path, marker: str,
) -> None:
    process = _start_and_wait_for(tmp_path, marker)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / LOCK_FILE).is_file(), "the killed run's lock file stays behind (nothing holds it)"
    done = subprocess.run(_command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    _assert_same_state(uninterrupted, tmp_path)
    assert not (tmp_path / LOCK_FILE).exists(), "the rerun took the stale lock over and released it"


def test_sigterm_stops_at_a_safe_point_with_one_line_and_resumes(tmp_path: Path, uninterrupted: Path) -> None:
    process = _start_and_wait_for(tmp_path, "checkpoints/state_w0000.safetensors")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("cbq: stopped:")]
    assert "SIGTERM: stopped" in line and "Rerun the same command to resume" in line
    assert (tmp_path / "checkpoints" / "state_w0000.safetensors").exists()
    assert not (tmp_path / "report.json").exists()
    assert not (tmp_path / LOCK_FILE).exists(), "a run stopped by SIGTERM releases its output folder"
    done = subprocess.run(_command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_state(uninterrupted, tmp_path)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def test_a_write_that_dies_half_way_leaves_the_previous_file_and_resumes(
    tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The second window's checkpoint write dies after half its bytes (a kill or a crash inside the writer):
    the half file never takes the checkpoint's name, and the rerun resumes from the first window."""
    from cbq_lightning import io

    real_write = io.write_safetensors
    calls = {"state": 0}

    class DiedWriting(BaseException):
        pass

    def dying_write(path, tensors, metadata):
        if metadata and "meta" in metadata:
            calls["state"] += 1
            if calls["state"] == 2:
                real_write(path, tensors, metadata)
                Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
                raise DiedWriting
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(io, "write_safetensors", dying_write)
    argv = ["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), *FLAGS]
    with pytest.raises(DiedWriting):
        main(argv)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "state_w0000.safetensors" in names and "state_w0001.safetensors" not in names
    # what a SIGKILL at that moment leaves behind: the writer's temporary file
    (tmp_path / "checkpoints" / ".state_w0001.safetensors.k1ll3d.safetensors").write_bytes(b"\0" * 100)
    monkeypatch.setattr(io, "write_safetensors", real_write)
    assert main(argv) == 0
    _assert_same_state(uninterrupted, tmp_path)


def test_a_full_disk_is_one_line_and_the_earlier_outputs_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from cbq_lightning import io

    argv = ["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), *FLAGS]
    assert main(argv) == 0  # a finished run in the folder
    capsys.readouterr()
    before = _digest(tmp_path)
    real_write = io.write_safetensors

    def no_space(path, tensors, metadata):
        if not Path(path).name.startswith(".quant_state"):  # the disk fills up while the quant state is written
            return real_write(path, tensors, metadata)
        with open(path, "wb") as handle:
            handle.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io, "write_safetensors", no_space)
    assert main([*argv, "--resume", "false", "--train.epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("cbq: error:")]
    assert "cannot write" in line and "quant_state.safetensors" in line and "No space left on device" in line
    assert "free space under" in line
    after = _digest(tmp_path)
    assert after["quant_state.safetensors"] == before["quant_state.safetensors"]
    assert after["model/model.safetensors"] == before["model/model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".quant_state")], "no temporary file left"
    # space again: the same command resumes from the windows the failed run checkpointed
    monkeypatch.setattr(io, "write_safetensors", real_write)
    assert main([*argv, "--train.epochs", "3"]) == 0
    assert capsys.readouterr().err.count("cbq: error") == 0


# --- SIGTERM outside the windows' training -----------------------------------------------------------------------

def test_sigterm_outside_a_deferred_block_stops_at_once_and_inside_one_at_its_end() -> None:
    from cbq_lightning.errors import RunStopped
    from cbq_lightning.stop import GracefulStop

    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handler
        with pytest.raises(RunStopped, match="outside the windows' training"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
        stop.requested = False
        reached_end_of_block = False
        with pytest.raises(RunStopped):
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                assert stop.requested  # noted, not acted on: the window loop acts at its next safe point
                reached_end_of_block = True
        assert reached_end_of_block
    assert signal.getsignal(signal.SIGTERM) == before, "the previous handler is back"


def test_a_stop_raised_inside_a_deferred_block_is_the_one_that_reaches_the_caller() -> None:
    from cbq_lightning.errors import RunStopped
    from cbq_lightning.stop import GracefulStop

    with GracefulStop() as stop, pytest.raises(RunStopped, match="during window 3"):
        with stop.deferred():
            stop.requested = True
            raise RunStopped("SIGTERM: stopped during window 3")


@pytest.mark.parametrize("stage", ["fp", "cbq", "export"])
def test_sigterm_outside_the_windows_stops_at_once_and_the_same_command_resumes(
    tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch, stage: str,
) -> None:
    """A SIGTERM during the full-precision reference (before any window), the final evaluation (after the last
    window) or the export (the last step) stops the run there, not minutes later; the rerun resumes from the
    windows' checkpoints (which outlive every step before the last) to the uninterrupted result."""
    from cbq_lightning import runner
    from cbq_lightning.errors import RunStopped
    from tests.conftest import load_recipe

    real_evaluate, real_export = runner._evaluate, runner.export_run

    def terminated_while(config, model, sets, device, label):
        if label == stage:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(config, model, sets, device, label)

    def terminated_while_exporting(run_dir, config):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_export(run_dir, config)

    monkeypatch.setattr(runner, "_evaluate", terminated_while)
    monkeypatch.setattr(runner, "export_run", terminated_while_exporting)
    monkeypatch.setenv("CBQ_CACHE_DIR", str(tmp_path / "fp-cache"))  # measured here, not taken from an earlier run
    export = ["--export.format", "compressed-tensors"] if stage == "export" else []
    config = load_recipe(TINY_RECIPE, *FLAGS, *export, "--output_dir", str(tmp_path))
    with pytest.raises(RunStopped, match="SIGTERM"):
        runner.run_quantize(config)
    assert (tmp_path / "report.json").exists() == (stage == "export"), "the export comes after the report"
    assert not (tmp_path / LOCK_FILE).exists(), "a run stopped by SIGTERM releases its output folder"
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("state_w*.safetensors"))
    assert bool(saved) == (stage != "fp"), saved  # before the first window nothing; after the last, its state
    monkeypatch.setattr(runner, "_evaluate", real_evaluate)
    monkeypatch.setattr(runner, "export_run", real_export)
    done = subprocess.run(_command(tmp_path, *export), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if stage != "fp":
        assert "resum" in done.stderr.lower(), done.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists(), "a finished run removes its checkpoints"
    if export:
        assert "export" in json.loads((tmp_path / "report.json").read_text())
    _assert_same_state(uninterrupted, tmp_path)
