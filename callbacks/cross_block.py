"""``CrossBlockCallback``: advances the sliding window around each window's ``trainer.fit``.

Before the fit (``setup``, which Lightning runs before it builds the optimizer, so the newly quantized
linears' parameters are part of it) it snapshots the full-precision teachers of entering blocks, runs the
preprocessing hooks (CFP), quantizes the entering blocks and caches the teacher targets
``Y_fp = T_fp(X_fp)`` and ``Y_h = T_fp(X_q)``. After the fit it finalises the leaving blocks, pushes both
caches through them and logs the per-block output error and per-window summaries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

from callbacks.hardened_objective import HardenedObjective
from cbq_lightning.crossblock import BlockError, CrossBlockState
from cbq_lightning.quant.convert import finalized_linears, quant_linears
from cbq_lightning.quant.qlinear import QuantLinear
from cbq_lightning.windows import Window


class WindowTargets(Dataset):
    """``(X_q[i], Y_fp[i], Y_h[i])`` read from the cross-block state when a batch is drawn.

    Reading lazily lets the dataloader be built before the callback has cached this window's targets.
    """

    def __init__(self, state: CrossBlockState) -> None:
        self.state = state

    def __len__(self) -> int:
        return self.state.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.state
        if state.y_fp is None or state.y_h is None:
            raise RuntimeError("window targets are not cached: CrossBlockCallback must run before the fit")
        return state.x_q[index], state.y_fp[index], state.y_h[index]


class CrossBlockCallback(L.Callback):
    """Prepares each window before its fit and finalises/advances after it; the one writer of the run's window
    records (``window_summaries``, the report's ``windows``), trained or not.

    Args:
        state: the caches and teachers shared by all windows of a run.
        device: where the window's blocks compute while it enters and leaves (the run's one device,
            :func:`cbq_lightning.distributed.compute_device`).
        objective: the callback that reads each fit's hardened objective (and keeps the best state); its
            figures go into the records. None: not measured.

    Every window is finished here, whichever way it went: trained (:meth:`on_fit_end`), put back at
    round-to-nearest by the guard or never trained (:meth:`finish_untrained`). Finishing leaves the window
    (finalises its blocks, advances the caches), writes its record, logs it, then tells the listeners
    (:meth:`add_listener`: the window checkpoint), so no path can skip a step.
    """

    def __init__(self, state: CrossBlockState, device: torch.device | str,
                 objective: HardenedObjective | None = None) -> None:
        self.state = state
        self.device = torch.device(device)
        self.objective = objective
        self.window_summaries: list[dict[str, Any]] = []
        self._listeners: list[Callable[[Window, int], None]] = []
        self._started = 0.0
        self._attempt = 1
        self._lr_scale = 1.0

    def state_dict(self) -> dict[str, Any]:
        """The finished windows' records: a resumed run's report lists every window, not only its own."""
        return {"windows": [dict(summary) for summary in self.window_summaries]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.window_summaries = [dict(summary) for summary in state_dict["windows"]]

    def add_listener(self, listener: Callable[[Window, int], None]) -> None:
        """Call ``listener(window, next_step)`` after each finished window's record is written (``next_step``: the
        TensorBoard step the next window starts from)."""
        self._listeners.append(listener)

    def _finish(self, window: Window, summary: dict[str, Any], errors: list[BlockError], logger: Any, method: str,
                log_it: bool, next_step: int) -> None:
        """The one end of every window: its record, its TensorBoard scalars, then the listeners."""
        self.window_summaries.append(summary)
        if log_it:
            log_window(logger, summary, errors, method=method)
        for listener in self._listeners:
            listener(window, next_step)

    def begin_attempt(self, attempt: int, lr_scale: float) -> None:
        """The divergence guard's try about to fit (1 = the first) and its learning-rate scale, for the record."""
        self._attempt, self._lr_scale = attempt, lr_scale

    def finish_untrained(
        self, window: Window, logger: Any, method: str, started: float, next_step: int = 0, **extra: Any
    ) -> dict[str, Any]:
        """Finalise ``window`` without training and record it: the RTN baseline's walk (``method='rtn'``), or a
        CBQ window the guard put back at round-to-nearest after it kept diverging (``extra`` says why;
        ``next_step``: the TensorBoard step the next window starts from)."""
        errors = self.state.leave(window, self.device)
        summary = {
            "index": window.index,
            "blocks": list(window.blocks),
            "finalized": list(window.finalized),
            "steps": 0,
            "loss_first": None,
            "loss_last": None,
            **extra,
            "wall_s": time.perf_counter() - started,
        }
        self._finish(window, summary, errors, logger, method, log_it=True, next_step=next_step)
        return summary

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._started = time.perf_counter()
        entering = self.state.enter(pl_module.window, self.device)
        if trainer.is_global_zero:
            log_preprocess(trainer.logger, self.state.preprocess_stats, entering)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        window, objective = pl_module.window, self.objective
        layers = [layer for _, layer in quant_linears(pl_module.blocks)]
        clip = [layer.mean_clip_ratio() for layer in layers if layer.quantizer is not None]
        act = [layer.act_quantizer.summary() for layer in layers if layer.act_quantizer is not None]
        trainable = trainable_parameter_counts(layers)  # before leave(): finalising drops the parameters
        errors = self.state.leave(window, self.device)
        finalized = [m for b in window.finalized for _, m in finalized_linears(self.state.blocks[b])]
        flips = [layer.flip_fraction for layer in finalized if layer.flip_fraction is not None]
        summary = {
            "index": window.index,
            "blocks": list(window.blocks),
            "finalized": list(window.finalized),
            "steps": int(trainer.global_step),
            # what the window trained, by kind: the evidence that a run is CBQ (LoRA-rounding factors and
            # clipping thresholds) and which extensions added parameters
            "trainable_parameters": trainable,
            # hardened-rounding reconstruction loss before and after training (what finalising gives)
            "loss_first": objective.first if objective else None,
            "loss_last": objective.last if objective else None,
            "train_loss_first": pl_module.train_loss_first,
            "train_loss_last": pl_module.train_loss_last,
            # with extensions.keep_best: the epoch whose end state was kept (0: the fit's starting state)
            "best_epoch": objective.best_epoch if objective else None,
            "best_loss": objective.best_loss if objective else None,
            # share of rounding decisions learned away from round-to-nearest; None when rounding is not learned
            "flip_fraction": sum(flips) / len(flips) if flips else None,
            "clip_ratio": sum(clip) / len(clip) if clip else 1.0,
            # mean activation clipping ratio (dynamic modes) or step (static); None when weight-only
            "act_clip": sum(act) / len(act) if act else None,
            "wall_s": time.perf_counter() - self._started,
            # the divergence guard's try that succeeded and its learning-rate scale
            "attempts": self._attempt,
            "lr_scale": self._lr_scale,
            "fallback": None,
        }
        self._finish(window, summary, errors, trainer.logger, "cbq", log_it=trainer.is_global_zero,
                     next_step=pl_module.step_offset + trainer.global_step)


def trainable_parameter_counts(layers: list[QuantLinear]) -> dict[str, int]:
    """Trainable values of a window's quantized linears by kind.

    ``rounding`` counts LoRA-Rounding's factors ``A1``, ``A2`` (or the offset form's full-rank offsets,
    reported separately as ``rounding_offset`` since that form is not LoRA-Rounding), ``weight_clip`` the
    clipping logits, ``activation_clip`` the activation quantizers' logits/steps, ``correction`` the
    low-rank corrections' factors.
    """
    counts = {"rounding": 0, "rounding_offset": 0, "weight_clip": 0, "activation_clip": 0, "correction": 0}
    for layer in layers:
        rounding = sum(p.numel() for p in layer.rounding_parameters() if p.requires_grad)
        counts["rounding_offset" if layer.rounding.kind == "offset" else "rounding"] += rounding
        counts["weight_clip"] += sum(p.numel() for p in layer.clip_parameters() if p.requires_grad)
        counts["activation_clip"] += sum(p.numel() for p in layer.act_parameters() if p.requires_grad)
        counts["correction"] += sum(p.numel() for p in layer.correction_parameters() if p.requires_grad)
    return counts


def log_window(logger: Any, summary: dict[str, Any], errors: list[BlockError], method: str) -> None:
    """Per-window summaries (step = window index) and per-block errors (step = block index).

    The block errors of the quantized model (``block_error/<method>``) and of RTN (``block_error/rtn``)
    share one chart per tag, plotted along the depth of the model.
    """
    if logger is None:
        return
    index = summary["index"]
    scalars = {
        f"window/{key}": float(summary[key])
        for key in (
            "loss_first", "loss_last", "train_loss_first", "train_loss_last", "best_epoch", "best_loss",
            "flip_fraction", "clip_ratio", "act_clip", "wall_s",
        )
        if summary.get(key) is not None
    }
    logger.log_metrics(scalars, step=index)
    for error in errors:
        values = {f"block_error/{method}": error.quantized}
        if error.rtn is not None:
            values["block_error/rtn"] = error.rtn
        logger.log_metrics(values, step=error.block)
    logger.save()


def log_preprocess(logger: Any, stats_by_block: dict[int, dict[str, float]], blocks: list[int]) -> None:
    """Preprocessing statistics (CFP outlier counts, thresholds, max before/after) of ``blocks`` along the
    depth.

    One chart per statistic and layer (e.g. ``cfp/act_max_before/input_layernorm``: the preprocessors
    name their statistics as TensorBoard tags), step = block index, so the effect of CFP reads as a curve
    down the model.
    """
    if logger is None:
        return
    for index in sorted(blocks):
        stats = stats_by_block.get(index)
        if stats:
            logger.log_metrics(stats, step=index)
