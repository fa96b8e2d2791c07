"""CBQ's walk over the windows: one LightningModule and one ``trainer.fit`` per window, with the divergence guard.

Why a module of its own: the runner's stages decide what is calibrated; this is how a window is trained (its
Trainer, its data loaders, retries at lower learning rates, the round-to-nearest fallback, a SIGTERM stop), and the
RTN baseline's walk that finalises each block without training.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from callbacks.cross_block import CrossBlockCallback, WindowTargets, log_preprocess
from callbacks.hardened_objective import HardenedObjective
from callbacks.progress import WindowProgressBar
from cbq_lightning.config import QuantizeConfig
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.errors import RunStopped, TrainingError
from cbq_lightning.guard import DivergenceError
from cbq_lightning.quant.convert import reset_block_to_round_to_nearest
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.stop import GracefulStop
from cbq_lightning.window import WindowModule
from cbq_lightning.windows import Window

log = logging.getLogger("cbq_lightning")


def quiet_lightning() -> None:
    """One Trainer per window would repeat Lightning's start-up banners dozens of times."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # blocks run in eval mode on purpose: calibration must not enable dropout
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _strategy(name: str) -> str | DDPStrategy:
    """A fresh strategy per window's Trainer (Lightning binds a strategy object to its first Trainer).

    Plain ``ddp`` skips the per-step buffer broadcast: the frozen weights are buffers that agree on every
    rank already, and broadcasting a window of 7B blocks each step would cost more than the step.
    """
    return DDPStrategy(broadcast_buffers=False) if name == "ddp" else name


def _window_module(
    config: QuantizeConfig, state: CrossBlockState, window: Window, step_offset: int, lr_scale: float,
    output_head: nn.Module | None,
) -> WindowModule:
    """The LightningModule of one window's fit (a retry builds a new one at a lower ``lr_scale``)."""
    return WindowModule(
        blocks=[state.blocks[i] for i in window.blocks],
        window=window,
        block_kwargs=state.block_kwargs.for_blocks(window.blocks),
        loss=config.loss,
        optim=config.train,
        rounding_tuning=config.advanced.rounding,
        lr_correction=config.extensions.lr_correction,
        lr_schedule=config.extensions.lr_schedule,
        gradient_init_batches=(config.extensions.rounding_init_batches
                               if config.extensions.rounding_init == "gradient" else None),
        step_offset=step_offset,
        lr_scale=lr_scale,
        explode_factor=config.advanced.guard.explode_factor,
        output_head=output_head,
        output_kl_weight=config.extensions.output_kl_weight,
        output_kl_tokens=config.extensions.output_kl_tokens,
        continuous=config.extensions.continuous,
    )


def _measures_hardened_objective(config: QuantizeConfig) -> bool:
    """Whether a fit runs its validation loop, the hardened objective (``advanced.monitor.hardened_loss`` or
    ``extensions.keep_best``, which compares it epoch against epoch)."""
    return config.advanced.monitor.hardened_loss or config.extensions.keep_best


def trainer_settings(config: QuantizeConfig) -> dict[str, Any]:
    """The recipe's ``trainer`` and ``advanced.trainer`` sections as ``L.Trainer`` arguments (a fresh strategy object
    for each Trainer)."""
    return {**dataclasses.asdict(config.trainer), **dataclasses.asdict(config.advanced.trainer),
            "strategy": _strategy(config.trainer.strategy), "default_root_dir": config.output_dir}


def _window_trainer(
    config: QuantizeConfig, epochs: int, logger: TensorBoardLogger, callbacks: list[L.Callback], total_windows: int
) -> L.Trainer:
    """The ``Trainer`` of one window's fit: the recipe's trainer settings, the run's shared logger, no
    checkpointing of its own (:class:`~callbacks.window_checkpoint.WindowCheckpoint` saves finished windows),
    and the window progress bar.

    The validation loop measures the hardened objective (:mod:`callbacks.hardened_objective`): once over every
    batch before training (Lightning's sanity check: the starting state), then after the last epoch, or after
    every epoch with ``extensions.keep_best``. It runs without inference mode: the window caches tensors in its
    forward that training reuses."""
    progress = [WindowProgressBar(total_windows)] if config.advanced.trainer.enable_progress_bar else []
    measured = _measures_hardened_objective(config)
    return L.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[*callbacks, *progress],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=-1 if measured else 0,
        limit_val_batches=1.0 if measured else 0,
        check_val_every_n_epoch=1 if config.extensions.keep_best else epochs,
        inference_mode=False,
        use_distributed_sampler=False,  # each rank already holds only its shard
        **trainer_settings(config),
    )


@dataclass
class WindowLoop:
    """CBQ's walk: one LightningModule and one ``trainer.fit`` per window, all logging into one run.

    A diverging fit is retried from the window's starting state with lower learning rates, then falls back to
    round-to-nearest (:mod:`cbq_lightning.guard`). ``records`` finishes every window (trained or
    fallen back): its record, then its listeners such as the checkpoint. ``output_head`` (final norm + LM head) goes to
    the window holding the last block, for ``extensions.output_kl_weight``.
    """

    config: QuantizeConfig
    scheme: QuantScheme
    state: CrossBlockState
    logger: TensorBoardLogger
    records: CrossBlockCallback
    objective: HardenedObjective
    extra_callbacks: Sequence[L.Callback]
    output_head: nn.Module | None
    stop: GracefulStop
    #: the whole run's window count: after a resume the schedule holds only the windows still to do
    total_windows: int

    def run(self, schedule: list[Window], step_offset: int) -> list[dict[str, Any]]:
        """Fit every window of ``schedule`` in turn; the records of the whole run (resumed windows included)."""
        for window in schedule:
            if self.stop.requested:
                raise self._stopped("before", window)
            step_offset = self._fit(window, step_offset)
        return self.records.window_summaries

    def _fit(self, window: Window, step_offset: int) -> int:
        """One window, with the guard's retries; returns the TensorBoard step the next window starts from."""
        guard, lr_scale = self.config.advanced.guard, 1.0
        last_block = len(self.state.blocks) - 1
        head = self.output_head if last_block in window.blocks else None
        for attempt in range(1, guard.retries + 2):
            module = _window_module(self.config, self.state, window, step_offset, lr_scale, head)
            # records (they finish the window, its checkpoint included), then the objective, then the caller's
            callbacks = [self.records, self.objective, *self.extra_callbacks]
            trainer = _window_trainer(self.config, self.config.train.epochs_for(self.scheme.w_bits), self.logger,
                                      callbacks, self.total_windows)
            targets, batch_size = WindowTargets(self.state), self.config.train.batch_size
            loader = DataLoader(targets, batch_size=batch_size, shuffle=self.config.advanced.train.shuffle,
                                generator=torch.Generator().manual_seed(self.config.seed + window.index))
            # the loss normalises per batch, so measurements meant to be compared batch the samples one fixed
            # way; its own generator: drawing a loader's base seed must not advance the global RNG
            fixed = (DataLoader(targets, batch_size=batch_size, shuffle=False, generator=torch.Generator())
                     if _measures_hardened_objective(self.config) else None)
            self.records.begin_attempt(attempt, lr_scale)
            try:
                trainer.fit(module, train_dataloaders=loader, val_dataloaders=fixed)
            except SIGTERMException:  # Lightning ended the fit at a step boundary: this window is not saved
                raise self._stopped("during", window) from None
            except DivergenceError as error:
                step_offset += trainer.global_step
                module.restore_start_state()
                if attempt <= guard.retries:
                    lr_scale *= guard.lr_factor
                    log.warning("%s; retrying from the window's start with learning rates x%g", error, lr_scale)
                    continue
                self._fall_back(window, attempt, error, step_offset)
                return step_offset
            summary = self.records.window_summaries[-1]
            losses = (summary["loss_first"], summary["loss_last"])
            if None in losses:  # hardened losses not measured: report the training loss
                losses = (summary["train_loss_first"], summary["train_loss_last"])
            log.info("%s: %d steps, loss %.4g -> %.4g, %.1fs", window, summary["steps"], *losses, summary["wall_s"])
            return step_offset + trainer.global_step
        raise AssertionError("unreachable: the last attempt returns or falls back")

    def _fall_back(self, window: Window, attempts: int, error: DivergenceError, step_offset: int) -> None:
        """A window that kept diverging: an error (``advanced.guard.fallback=error``), or finalised at round-to-nearest,
        its overlap blocks' warm start included, recorded and saved like a trained one."""
        guard = self.config.advanced.guard
        if guard.fallback == "error":
            raise TrainingError(
                f"{error}; still diverging after {guard.retries} retries. Lower train.lr_rounding / "
                "train.lr_clip, use precision 32-true, or set advanced.guard.fallback=rtn."
            ) from error
        log.warning("%s; after %d retries %s falls back to round-to-nearest", error, guard.retries, window)
        started = time.perf_counter()
        for index in window.blocks:
            reset_block_to_round_to_nearest(self.state.blocks[index])
        self.records.finish_untrained(window, self.logger, "cbq", started, next_step=step_offset, attempts=attempts,
                                      fallback="rtn", divergence=str(error))

    def _stopped(self, when: str, window: Window) -> RunStopped:
        """The message of a SIGTERM stop: where (windows counted from 1, as the progress bar), what is saved,
        how to go on."""
        finished = self.records.window_summaries
        last = finished[-1]["index"] + 1 if finished else 0
        where_saved = Path(self.config.output_dir) / "checkpoints"
        saved = {0: "no window had finished", 1: f"window 1 is saved in {where_saved}"}.get(
            last, f"windows 1-{last} are saved in {where_saved}")
        where = f"{when} window {window.index + 1}/{self.total_windows} (blocks {window.blocks[0]}-{window.blocks[-1]})"
        return RunStopped(f"SIGTERM: stopped {where}; {saved}. Rerun the same command to resume.")


def round_to_nearest(state: CrossBlockState, schedule: list[Window], records: CrossBlockCallback,
                      logger: TensorBoardLogger) -> list[dict[str, Any]]:
    """The RTN baseline: the same walk down the model, finalising each block without training."""
    for window in tqdm(schedule, desc="RTN blocks", unit="block"):
        started = time.perf_counter()
        entering = state.enter(window, records.device, cache_targets=False)
        log_preprocess(logger, state.preprocess_stats, entering)
        records.finish_untrained(window, logger, "rtn", started)
    return records.window_summaries

