"""``HardenedObjective``: the window's objective with hardened rounding, read from Lightning's validation loop,
and ``extensions.keep_best`` on top of it.

Why hardened: LoRA-Rounding's soft decisions reproduce the full-precision weight at initialisation, so the
*training* loss starts artificially low; the objective with the decisions hardened is what finalising the window
would give, hence the figure that says what a fit achieved. The window computes it in ``validation_step`` over
the fit's calibration samples in a fixed batching (:meth:`cbq_lightning.window.WindowModule.validation_step`,
reduced over the ranks by Lightning); the runner has Lightning run that validation once before training (the
sanity check, over every batch) and after the last epoch, or after every epoch with ``extensions.keep_best``.

With ``extensions.keep_best`` a window finishes with the best of its starting state and its epoch-end states, which
guards a fit that would leave the window worse than it started (a learning rate too high for the window).
"""

from __future__ import annotations

import lightning as L

from cbq_lightning.guard import TrainableSnapshot
from cbq_lightning.window import HARDENED_LOSS


class HardenedObjective(L.Callback):
    """Records the hardened objective of a window's fit at its start and end; with ``keep_best``, keeps the best
    epoch-end state (0: the starting state) and restores it after the last epoch.

    After a fit: ``first`` (the starting state), ``last`` (the state the window keeps), and with ``keep_best``
    ``best_epoch`` / ``best_loss``; all None where not measured.
    """

    def __init__(self, keep_best: bool) -> None:
        self.keep_best = keep_best
        self._reset()

    def _reset(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.best_epoch: int | None = None
        self.best_loss: float | None = None
        self._best_state: TrainableSnapshot | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()  # one instance serves every window of a run

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = float(trainer.callback_metrics[HARDENED_LOSS])
        if trainer.sanity_checking:  # before the first step: the state the fit starts from
            self.first = loss
            if self.keep_best:
                self.best_epoch, self.best_loss, self._best_state = 0, loss, TrainableSnapshot(pl_module)
            return
        epoch = trainer.current_epoch + 1
        self.last = loss
        if not self.keep_best:
            return
        if loss < self.best_loss:
            self.best_epoch, self.best_loss, self._best_state = epoch, loss, TrainableSnapshot(pl_module)
        if epoch >= trainer.max_epochs:
            # after the last epoch: go back to the best state, before the end-of-fit hooks read the window
            if self.best_epoch != epoch:
                self._best_state.restore(pl_module)
            self.last = self.best_loss
