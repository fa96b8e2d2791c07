"""``extensions.keep_best``: a window finishes with the best of its starting state and its epoch-end states."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.hardened_objective import HardenedObjective
from cbq_lightning.runner import run_quantize
from cbq_lightning.window import HARDENED_LOSS
from tests.conftest import TINY_RECIPE, load_recipe

EPOCHS = 3


def _windows(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    config = load_recipe(
        TINY_RECIPE, "--output_dir", str(out), "--train.epochs", str(EPOCHS), "--advanced.monitor.hardened_loss", "true",
        "--eval.datasets", "[]", "--advanced.trainer.enable_progress_bar", "false", *overrides,
    )
    run_quantize(config)
    return json.loads((out / "report.json").read_text())["windows"]


class _Slope(L.LightningModule):
    """One parameter ``p`` (start 1.0); the validation objective is ``p**2``, and each training step moves ``p`` by
    ``step`` (SGD on ``-step * p`` with lr 1): a positive step makes every epoch worse than the start, a negative
    one better. The objective's course is fixed by construction, so what keep_best does with it is the code's."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(1.0))
        self.step = step

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return -self.step * self.p

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log(HARDENED_LOSS, self.p.detach() ** 2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _fit(step: float, keep_best: bool, epochs: int = 3) -> tuple[HardenedObjective, float]:
    module, objective = _Slope(step), HardenedObjective(keep_best=keep_best)
    loader = DataLoader(torch.zeros(2, 1), batch_size=1)  # two steps per epoch
    trainer = L.Trainer(max_epochs=epochs, callbacks=[objective], num_sanity_val_steps=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return objective, float(module.p.detach())


def test_a_fit_that_only_hurts_returns_exactly_to_its_start() -> None:
    plain, p_plain = _fit(step=0.5, keep_best=False)  # p: 1 -> 2 -> 3 -> 4 at the epoch ends
    assert (plain.first, plain.last, p_plain) == (1.0, 16.0, 4.0) and plain.best_epoch is None
    kept, p_kept = _fit(step=0.5, keep_best=True)
    assert (kept.first, kept.best_epoch, kept.best_loss, kept.last, p_kept) == (1.0, 0, 1.0, 1.0, 1.0)


def test_the_best_epoch_end_is_kept_not_the_last() -> None:
    # p: 1 -> 0 -> -1 -> -2 at the epoch ends: objective 1, 0, 1, 4; epoch 1 is the best
    kept, p_kept = _fit(step=-0.5, keep_best=True)
    assert (kept.first, kept.best_epoch, kept.best_loss, kept.last, p_kept) == (1.0, 1, 0.0, 0.0, 0.0)


def test_keep_best_on_real_windows_never_ends_worse_than_the_start(tmp_path: Path) -> None:
    """The whole path (window module, records, report) at a learning rate high enough to hurt some windows."""
    hurt = ["--train.lr_rounding", "0.3", "--train.lr_clip", "0.3"]
    kept = _windows(tmp_path, "kept", *hurt, "--extensions.keep_best", "true")
    for window in kept:
        # loss_last is measured by the callback after the fit, on the same fixed batching: the state kept
        assert window["loss_last"] == window["best_loss"] <= window["loss_first"]
        assert window["best_epoch"] > 0 or window["loss_last"] == window["loss_first"]


def test_a_fit_that_helps_keeps_its_best_epoch(tmp_path: Path) -> None:
    kept = _windows(tmp_path, "kept", "--extensions.keep_best", "true")
    for window in kept:
        assert 0 <= window["best_epoch"] <= EPOCHS
        assert window["loss_last"] == window["best_loss"] <= window["loss_first"]
    assert any(window["best_epoch"] > 0 for window in kept), "training at the recipe's rates must help somewhere"
    events = EventAccumulator(str(tmp_path / "kept" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("window/best_epoch")] == [float(w["best_epoch"]) for w in kept]
