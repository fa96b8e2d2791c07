"""Progress bar that says which window of how many is training (one bar per window fit)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class WindowProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, its description ``window i/n (blocks a-b) epoch e``."""

    def __init__(self, num_windows: int, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.num_windows = num_windows

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        window = pl_module.window
        self.train_progress_bar.set_description(
            f"window {window.index + 1}/{self.num_windows} (blocks {window.blocks[0]}-{window.blocks[-1]}) "
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )
