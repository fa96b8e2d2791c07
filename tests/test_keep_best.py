"""``train.keep_best``: a window finishes with the best of its starting state and its epoch-end states."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe

EPOCHS = 3


def _windows(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    config = load_recipe(
        TINY_RECIPE, "--output_dir", str(out), "--train.epochs", str(EPOCHS), "--monitor.hardened_loss", "true",
        "--eval.datasets", "[]", "--trainer.enable_progress_bar", "false", *overrides,
    )
    run_quantize(config)
    return json.loads((out / "report.json").read_text())["windows"]


def test_a_fit_that_hurts_returns_to_its_start(tmp_path: Path) -> None:
    """At learning rate 0.3 training leaves the first window worse than it started (checked without
    keep_best); with it, that window ends exactly at its starting state and no window ends worse than it
    started."""
    hurt = ["--train.lr_rounding", "0.3", "--train.lr_clip", "0.3"]
    plain = _windows(tmp_path, "plain", *hurt)  # the recipe as it is: keep-best off unless asked for
    assert plain[0]["loss_last"] > 1.2 * plain[0]["loss_first"]
    assert all(w["best_epoch"] is None and w["best_loss"] is None for w in plain)
    kept = _windows(tmp_path, "kept", *hurt, "--train.keep_best", "true")
    # same start (the first window's inputs are FP), measured by the callback (plain) and by the window (kept)
    assert kept[0]["loss_first"] == plain[0]["loss_first"]
    assert kept[0]["best_epoch"] == 0
    for window in kept:
        # loss_last is measured by the callback after the fit, on the same fixed batching: the state kept
        assert window["loss_last"] == window["best_loss"] <= window["loss_first"]
        assert window["best_epoch"] > 0 or window["loss_last"] == window["loss_first"]


def test_a_fit_that_helps_keeps_its_best_epoch(tmp_path: Path) -> None:
    kept = _windows(tmp_path, "kept", "--train.keep_best", "true")
    for window in kept:
        assert 0 <= window["best_epoch"] <= EPOCHS
        assert window["loss_last"] == window["best_loss"] <= window["loss_first"]
    assert any(window["best_epoch"] > 0 for window in kept), "training at the recipe's rates must help somewhere"
    events = EventAccumulator(str(tmp_path / "kept" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("window/best_epoch")] == [float(w["best_epoch"]) for w in kept]
