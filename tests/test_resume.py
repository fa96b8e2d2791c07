"""A killed run resumes from the last finished window and ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from callbacks.progress import WindowProgressBar
from cbq_lightning.errors import ConfigError, FileFormatError
from cbq_lightning.lock import LOCK_FILE
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, fast_flags, load_recipe

FAST = fast_flags()


class Killed(RuntimeError):
    """The test's stand-in for a killed process."""


class KillAtWindow(L.Callback):
    """Test-only fault: raises when window ``index`` starts training (the windows before it are finished)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.window.index == self.index:
            raise Killed(f"killed at window {self.index}")


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "quant_state.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(out), *FAST))
    return out


def test_killed_run_resumes_at_the_next_window_bit_for_bit(tmp_path: Path, uninterrupted: Path) -> None:
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST), [KillAtWindow(2)])
    assert not (tmp_path / LOCK_FILE).exists(), "a run that fails releases its output folder"
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["block_0000.safetensors", "block_0001.safetensors",
                                                             "state_w0000.safetensors", "state_w0001.safetensors"]
    started: list[int] = []
    bar_totals: list[int] = []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            started.append(pl_module.window.index)
            bar_totals.extend(c.num_windows for c in trainer.callbacks if isinstance(c, WindowProgressBar))

    # progress bars may change on resume: on here, to see that the bar counts the run's windows, not those left
    resumed_args = (*FAST, "--advanced.trainer.enable_progress_bar", "true")
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *resumed_args), [Record()]).report
    assert started == [2], "only the unfinished window trains again"
    assert bar_totals == [3], "the bar says 'window 3/3', not '3/1'"
    assert report["resumed_after_window"] == 1 and report["recomputed_windows"] == [2]
    assert [w["index"] for w in report["windows"]] == [0, 1, 2]
    assert [e["block"] for e in report["block_errors"]] == [0, 1, 2, 3]
    expected, resumed = _state(uninterrupted), _state(tmp_path)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    reference = json.loads((uninterrupted / "report.json").read_text())
    assert report["final_error"] == reference["final_error"]
    # the records of the windows finished before the kill come back from the checkpoint, whole
    untimed = [[{k: v for k, v in w.items() if k != "wall_s"} for w in r["windows"]] for r in (report, reference)]
    assert untimed[0] == untimed[1]
    assert not checkpoints.exists(), "a finished run removes its checkpoints"


def test_changed_config_refuses_to_resume_and_resume_false_starts_over(tmp_path: Path) -> None:
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST), [KillAtWindow(1)])
    changed = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST, "--train.lr_clip", "0.5")
    with pytest.raises(ConfigError, match=r"train\.lr_clip \(0\.02 -> 0\.5\).*--resume false"):
        run_quantize(changed)
    started: list[int] = []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            started.append(pl_module.window.index)

    fresh = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST, "--train.lr_clip", "0.5", "--resume", "false")
    report = run_quantize(fresh, [Record()]).report
    assert started == [0, 1, 2] and report["resumed_after_window"] is None


@pytest.mark.parametrize("victim", ["state_w0001.safetensors", "block_0000.safetensors"])
def test_a_damaged_checkpoint_is_a_clean_error_and_is_left_alone(tmp_path: Path, victim: str) -> None:
    """Finished windows are written atomically, so only a foreign hand or a failing disk damages one: the
    resume names the file and the two ways on, and deletes nothing (the user decides)."""
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST), [KillAtWindow(2)])
    checkpoints = tmp_path / "checkpoints"
    damaged = checkpoints / victim
    damaged.write_bytes(damaged.read_bytes()[:-100])
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    with pytest.raises(FileFormatError, match=rf"{victim}: truncated.*remove .*checkpoints or pass --resume false"):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST))
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST, "--resume", "false")).report
    assert report["resumed_after_window"] is None and report["recomputed_windows"] == [0, 1, 2]


def test_eval_settings_may_change_on_resume(tmp_path: Path) -> None:
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST), [KillAtWindow(1)])
    flags = [*FAST, "--eval.datasets", "[shipped]", "--eval.seqlen", "128", "--eval.max_windows", "2"]
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *flags)).report
    assert report["resumed_after_window"] == 0 and report["eval"][0]["windows"] == 2


@pytest.mark.parametrize(("init", "column_scale"), [("random", "0"), ("gradient", "0"), ("random", "1")])
def test_lora_rounding_from_gptq_resumes_bit_for_bit(tmp_path: Path, init: str, column_scale: str) -> None:
    """The shipped recipes' combination: LoRA-Rounding started from GPTQ with overlapping windows. The overlap
    block's calibrating state (its GPTQ shift and V0, computed from data when it entered) is restored on
    resume, so the run ends where an uninterrupted one does; with ``extensions.rounding_init: gradient`` the resumed
    window re-aligns only its entering block, from the same samples, and keeps the overlap block's factors; with
    ``extensions.column_scale`` the overlap block's scale (from its inputs when it entered) is restored too."""
    flags = (*FAST, "--extensions.gptq", "{}", "--extensions.clip_search", "{}", "--cfp.weights", "true", "--extensions.rounding_init", init,
             "--extensions.column_scale", column_scale)
    reference = tmp_path / "uninterrupted"
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(reference), *flags))
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(killed), *flags), [KillAtWindow(2)])
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(killed), *flags)).report
    assert report["resumed_after_window"] == 1 and report["recomputed_windows"] == [2]
    expected, resumed = _state(reference), _state(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_a_rotated_activation_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    """With rotations the model is rotated again on resume (same seed, same matrices) before the finished blocks
    come back from the checkpoint, and the overlap block keeps rotating its down projection's input online."""
    flags = (*FAST, "--quant.scheme", "W4A4", "--extensions.gptq", "{}", "--extensions.rotation", "{}")
    reference = tmp_path / "uninterrupted"
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(reference), *flags))
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(killed), *flags), [KillAtWindow(2)])
    result = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(killed), *flags))
    assert result.report["resumed_after_window"] == 1
    assert all(layer.mlp.down_proj.input_rotation is not None for layer in result.model.model.layers)
    expected, resumed = _state(reference), _state(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_kept_checkpoints_let_a_rerun_try_another_end_to_end_phase_without_training_a_window(tmp_path: Path) -> None:
    """``keep_checkpoints``: a finished run keeps its window checkpoints; a rerun that adds (or changes) the end-to-end
    phase resumes after the last window, trains no window, and ends bit for bit where a fresh run with that phase
    ends. Without the switch the rerun removes the checkpoints, as every finished run does."""
    phase = ("--extensions.end_to_end", "{lr: 0.01}")
    fresh = tmp_path / "fresh"
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(fresh), *FAST, *phase))
    kept = tmp_path / "kept"
    first = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(kept), *FAST, "--keep_checkpoints", "true"))
    assert first.report["end_to_end"] is None and (kept / "checkpoints").is_dir()
    windows_only = _state(kept)
    started: list[int] = []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            started.append(pl_module.window.index)  # the callbacks join the windows' fits

    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(kept), *FAST, *phase), [Record()]).report
    assert started == [], "no window trains again"
    assert report["resumed_after_window"] == 2 and report["recomputed_windows"] == []
    assert report["end_to_end"]["steps"] > 0
    expected, rerun = _state(fresh), _state(kept)
    assert expected.keys() == rerun.keys()
    for key in expected:
        assert torch.equal(expected[key], rerun[key]), key
    assert report["end_to_end"]["kept"] != all(torch.equal(windows_only[k], rerun[k]) for k in rerun)
    assert not (kept / "checkpoints").exists(), "without keep_checkpoints a finished run removes them"
