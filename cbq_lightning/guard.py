"""Divergence guard: a window whose loss turns non-finite or explodes is retried, then falls back to RTN.

A four-hour run must not die - or, worse, finish with NaN weights - because one window diverged. When a
training step sees a non-finite loss, or a loss ``explode_factor`` times the window's first loss, the
step raises :class:`DivergenceError`; the runner restores the window's trainable state as it was before
the fit (:class:`TrainableSnapshot`), lowers the learning rates by ``lr_factor`` and fits again, up to
``retries`` times. After that the window's blocks drop what they learned and are finalised at
round-to-nearest (``fallback: rtn``), or the run stops with a clear error (``fallback: error``). Either
way ``report.json`` and the log say what happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cbq_lightning.errors import ConfigError, TrainingError


@dataclass
class GuardConfig:
    """What a diverging window does (``advanced.guard``).

    Attributes:
        retries: fits retried after a divergence, each from the window's starting state.
        lr_factor: learning-rate multiplier applied at each retry.
        explode_factor: a loss above this multiple of the fit's first loss counts as a divergence.
        fallback: after the retries, ``rtn`` finalises the window at round-to-nearest and goes on;
            ``error`` stops the run.
    """

    retries: int = 2
    lr_factor: float = 0.1
    explode_factor: float = 1000.0
    fallback: Literal["rtn", "error"] = "rtn"

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"advanced.guard.retries={self.retries} must be >= 0.")
        if not 0.0 < self.lr_factor <= 1.0:
            raise ConfigError(f"advanced.guard.lr_factor={self.lr_factor} must lie in (0, 1].")
        if self.explode_factor <= 1.0:
            raise ConfigError(f"advanced.guard.explode_factor={self.explode_factor} must be > 1.")
        if self.fallback not in ("rtn", "error"):
            raise ConfigError(f"advanced.guard.fallback={self.fallback!r} is unknown: use 'rtn' or 'error'.")


class DivergenceError(TrainingError):
    """A window's loss became non-finite or exploded (caught by the runner, which retries)."""

    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


def check_loss(loss: float, first_loss: float | None, explode_factor: float, where: str, step: int) -> None:
    """Raise :class:`DivergenceError` on a non-finite or exploding loss."""
    if not math.isfinite(loss):
        raise DivergenceError(f"{where}: non-finite loss {loss} at step {step}", step, loss)
    if first_loss is not None and first_loss > 0 and loss > explode_factor * first_loss:
        raise DivergenceError(
            f"{where}: loss exploded to {loss:.4g} at step {step} ({loss / first_loss:.0f}x its first value)", step, loss
        )


class TrainableSnapshot:
    """Copies of a module's trainable tensors (and its activation quantizers' lazy-init state), to restore.

    Taken when a fit starts, after the entering blocks were quantized, so restoring it returns the window
    exactly to where that fit began.
    """

    def __init__(self, module: nn.Module) -> None:
        self._parameters = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
        self._buffers = {
            name: b.detach().clone() for name, b in module.named_buffers() if name.endswith(".initialized")
        }

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        parameters = dict(module.named_parameters())
        for name, value in self._parameters.items():
            parameters[name].copy_(value)
        buffers = dict(module.named_buffers())
        for name, value in self._buffers.items():
            buffers[name].copy_(value)
