"""Continuous approximations of rounding and clamping during a window's fit (docs/method.md §2 extensions, He Li et al. 2024).

The straight-through estimator treats ``round`` as the identity backwards and ``clamp`` as a hard gate: a
value beyond a clipping bound passes no gradient at all, and every value gets the same gradient wherever it
sits between two codes. The continuous approximations replace both functions *in the training forward* by
smooth ones with a temperature ``T``:

* ``round_T(x) = floor(x) + sigmoid(T * (x - floor(x) - 0.5))`` (``estimator: sigmoid``), used wherever the
  rounding is not learned (activation quantizers; weights unless soft LoRA-Rounding decides them);
* ``clamp_T(x, lo, hi) = lo + softplus_T(x - lo) - softplus_T(x - hi)`` with
  ``softplus_T(y) = log(1 + exp(T * y)) / T`` (``clamp: smooth``), so values near and beyond a clipping
  bound still pass gradient to the thresholds and to what produced them.

Both tend to the exact functions as ``T`` grows. ``T`` is annealed geometrically over each window's steps
from ``temperature_start`` to ``temperature_end``, so the fit ends on (almost) the function it is
finalised with. Outside the training forward (no-grad passes: the hardened-loss measurement, the next
window's inputs, finalisation, evaluation) quantizers always use the exact functions, so the model that is
exported is exactly the one the measurements see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.section_types import check_field_types

Estimator = Literal["ste", "sigmoid"]
ClampMode = Literal["hard", "smooth"]
ESTIMATORS: tuple[str, ...] = ("ste", "sigmoid")
CLAMP_MODES: tuple[str, ...] = ("hard", "smooth")


def sigmoid_round(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``floor(x) + sigmoid(T * (frac(x) - 0.5))``: 0.5 at half-way, the nearest integer as ``T`` grows."""
    floor = torch.floor(x)
    return floor + torch.sigmoid(temperature * (x - floor - 0.5))


def smooth_clamp(
    x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float, temperature: float
) -> torch.Tensor:
    """``low + softplus_T(x - low) - softplus_T(x - high)``: ``x`` inside, the bounds outside, smooth between.

    Its gradient is ``sigmoid(T (x - low)) - sigmoid(T (x - high))``: 1/2 exactly at a bound, decaying over
    about ``1/T`` beyond it (the hard clamp's is 1 inside and 0 outside).
    """
    return low + F.softplus(x - low, beta=temperature) - F.softplus(x - high, beta=temperature)


@dataclass(frozen=True)
class ContinuousApprox:
    """Which continuous approximations a fit uses, and their temperature schedule: the ``extensions.continuous``
    section (null: straight-through rounding and hard clamps; a section that changes neither is refused).

    Attributes:
        estimator: ``ste`` (straight-through, exact forward) or ``sigmoid`` (``round_T`` in the forward).
        clamp: ``hard`` or ``smooth`` (``clamp_T``).
        temperature_start: ``T`` at a window's first step (small = smooth; 4 moves a value at a code by 0.12).
        temperature_end: ``T`` at its last step (large = almost exact; 64 moves it by 1e-14).
    """

    estimator: str = "ste"
    clamp: str = "hard"
    temperature_start: float = 4.0
    temperature_end: float = 64.0

    def __post_init__(self) -> None:
        check_field_types(self, "extensions.continuous")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(
                f"extensions.continuous.estimator={self.estimator!r} is unknown: use one of {', '.join(ESTIMATORS)}."
            )
        if self.clamp not in CLAMP_MODES:
            raise ConfigError(f"extensions.continuous.clamp={self.clamp!r} is unknown: use one of {', '.join(CLAMP_MODES)}.")
        if not 0.0 < self.temperature_start <= self.temperature_end:
            raise ConfigError(
                f"extensions.continuous.temperature_start={self.temperature_start}, temperature_end={self.temperature_end}: "
                "need 0 < start <= end (the temperature rises so that the fit ends near the exact functions)."
            )

    @property
    def active(self) -> bool:
        """Whether anything differs from the straight-through, hard-clamp default."""
        return self.estimator == "sigmoid" or self.clamp == "smooth"

    def temperature_at(self, step: int, total_steps: int) -> float:
        """Geometric interpolation from start (step 0) to end (the last step, ``total_steps - 1``)."""
        if total_steps <= 1:
            return self.temperature_end
        t = min(max(step / (total_steps - 1), 0.0), 1.0)
        return math.exp(math.log(self.temperature_start) + t * math.log(self.temperature_end / self.temperature_start))


class SmoothableQuantizer(nn.Module):
    """Base of the quantizers: holds the temperatures the window sets, and the rounding/clamping they imply.

    ``round_temperature`` / ``clamp_temperature`` are None (exact functions) unless a fit with continuous
    approximations sets them; even then they act only in a training-mode forward with gradients enabled.
    """

    def __init__(self) -> None:
        super().__init__()
        self.round_temperature: float | None = None
        self.clamp_temperature: float | None = None

    def _smoothing(self, temperature: float | None) -> float | None:
        if temperature is None or not self.training or not torch.is_grad_enabled():
            return None
        return temperature

    def smooth_or_ste_round(self, x: torch.Tensor, ste_round) -> torch.Tensor:
        """``round_T(x)`` while a smoothed fit trains, ``ste_round(x)`` otherwise."""
        temperature = self._smoothing(self.round_temperature)
        return ste_round(x) if temperature is None else sigmoid_round(x, temperature)

    def smooth_or_hard_clamp(
        self, x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float
    ) -> torch.Tensor:
        """``clamp_T(x, low, high)`` while a smoothed fit trains, ``torch.clamp`` otherwise."""
        temperature = self._smoothing(self.clamp_temperature)
        if temperature is None:
            return torch.clamp(x, low, high)
        return smooth_clamp(x, low, high, temperature)


def set_temperatures(module: nn.Module, settings: ContinuousApprox | None, temperature: float | None) -> int:
    """Set (or with ``temperature=None`` clear) the temperatures of every quantizer under ``module``.

    Returns how many quantizers were set. Only the approximations ``settings`` switches on get a temperature.
    """
    count = 0
    for child in module.modules():
        if isinstance(child, SmoothableQuantizer):
            on = settings is not None and temperature is not None
            child.round_temperature = temperature if on and settings.estimator == "sigmoid" else None
            child.clamp_temperature = temperature if on and settings.clamp == "smooth" else None
            count += 1
    return count
