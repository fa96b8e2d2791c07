"""The divergence guard: planted NaNs are retried, then fall back to RTN; nothing non-finite is written."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from cbq_lightning.errors import ConfigError, TrainingError
from cbq_lightning.export.quant_state import load_quant_state
from cbq_lightning.guard import DivergenceError, GuardConfig, check_loss
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, fast_flags, load_recipe
from tests.test_resume import KillAtWindow, Killed

FAST = fast_flags()


class PoisonWindow(L.Callback):
    """Test-only fault: sets a trainable tensor of one window to NaN in its first ``fits`` fits."""

    def __init__(self, window: int, fits: int) -> None:
        self.window = window
        self.fits = fits
        self.poisoned = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.window.index == self.window and batch_idx == 1 and self.poisoned < self.fits:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))
            self.poisoned += 1


def test_check_loss() -> None:
    check_loss(0.5, None, 1000.0, "w", 0)
    check_loss(400.0, 0.5, 1000.0, "w", 3)
    with pytest.raises(DivergenceError, match="non-finite"):
        check_loss(float("nan"), 0.5, 1000.0, "w", 2)
    with pytest.raises(DivergenceError, match="exploded"):
        check_loss(600.0, 0.5, 1000.0, "w", 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"retries": -1}, "advanced.guard.retries"), ({"lr_factor": 0.0}, "advanced.guard.lr_factor"),
     ({"explode_factor": 1.0}, "advanced.guard.explode_factor"), ({"fallback": "skip"}, "advanced.guard.fallback")],
)
def test_guard_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuardConfig(**kwargs)


def _all_finite(run: Path) -> bool:
    tensors = list(load_file(str(run / "quant_state.safetensors")).values())
    tensors += list(load_file(str(run / "model" / "model.safetensors")).values())
    return all(torch.isfinite(t.float()).all() for t in tensors)


def test_a_window_that_keeps_diverging_falls_back_to_rtn(tmp_path: Path) -> None:
    poison = PoisonWindow(window=1, fits=10)
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "cbq"), *FAST), [poison]).report
    assert poison.poisoned == 3, "the first fit and both retries were poisoned"
    assert report["guard"] == {"retried_windows": [1], "rtn_fallback_windows": [1]}
    window = report["windows"][1]
    assert window["fallback"] == "rtn" and window["attempts"] == 3 and "non-finite" in window["divergence"]
    assert all(w["fallback"] is None for i, w in enumerate(report["windows"]) if i != 1)
    assert _all_finite(tmp_path / "cbq")
    assert all(math.isfinite(e["quantized"]) for e in report["block_errors"])
    # block 1 (finalised by window 1) holds exactly the round-to-nearest codes of a plain RTN run
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "rtn"), "--method", "rtn", *FAST))
    fallback = load_quant_state(tmp_path / "cbq" / "quant_state.safetensors")
    rtn = load_quant_state(tmp_path / "rtn" / "quant_state.safetensors")
    for field in ("qweight", "scales", "zeros"):
        assert torch.equal(fallback["model.layers.1.mlp.down_proj"][field], rtn["model.layers.1.mlp.down_proj"][field])
    assert not torch.equal(fallback["model.layers.0.mlp.down_proj"]["scales"], rtn["model.layers.0.mlp.down_proj"]["scales"])


def test_a_single_divergence_is_retried_with_lower_learning_rates(tmp_path: Path) -> None:
    poison = PoisonWindow(window=0, fits=1)
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST), [poison]).report
    assert report["guard"] == {"retried_windows": [0], "rtn_fallback_windows": []}
    window = report["windows"][0]
    assert window["attempts"] == 2 and window["lr_scale"] == pytest.approx(0.1) and window["fallback"] is None
    assert window["steps"] == 8, "the retry trains the whole window again"
    assert _all_finite(tmp_path)


def test_fallback_error_stops_the_run(tmp_path: Path) -> None:
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--advanced.guard.fallback", "error",
                         "--advanced.guard.retries", "0", *FAST)
    with pytest.raises(TrainingError, match="advanced.guard.fallback=rtn"):
        run_quantize(config, [PoisonWindow(window=0, fits=5)])
    assert not (tmp_path / "quant_state.safetensors").exists()



def test_a_fallen_back_window_is_finished_like_a_trained_one(tmp_path: Path) -> None:
    """The fallback goes through the same end as a fit: recorded, then saved, so a run killed after it resumes
    with the window kept at round-to-nearest and its record in the report."""
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "run"), *FAST),
                     [PoisonWindow(window=1, fits=10), KillAtWindow(2)])
    assert (tmp_path / "run" / "checkpoints" / "state_w0001.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "block_0001.safetensors").is_file()
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "run"), *FAST)).report
    assert report["resumed_after_window"] == 1 and report["recomputed_windows"] == [2]
    assert report["guard"] == {"retried_windows": [1], "rtn_fallback_windows": [1]}
    # and it is the run that was never interrupted, tensor for tensor
    whole = tmp_path / "whole"
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(whole), *FAST), [PoisonWindow(window=1, fits=10)])
    resumed, uninterrupted = load_file(str(tmp_path / "run" / "quant_state.safetensors")), load_file(str(whole / "quant_state.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
