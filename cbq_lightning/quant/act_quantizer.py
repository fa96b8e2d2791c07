"""Activation quantizer on the input of every quantized linear (docs/method.md §1, activations).

Three modes:

* ``dynamic_sym`` (default): per token, symmetric, ``scale = sigmoid(a) * max|x| / (2^(b-1) - 1)``,
  codes in ``[-2^(b-1), 2^(b-1) - 1]``. The scale is computed at run time from each token, which is
  what serving kernels (vLLM's int8/int4 dynamic per-token paths) run, so the only trained quantity is
  the per-layer clipping logit ``a``.
* ``dynamic_asym``: per token, asymmetric (``[sigmoid(l) * min x, sigmoid(u) * max x]`` with an integer
  zero-point), two logits per layer.
* ``static_lsq``: one step size per layer for all tokens (LSQ, Esser et al. 2020), learned with LSQ's
  gradient scaling. The step is initialised from the first batch it sees by a grid search of the
  clipping ratio that minimises that batch's quantization MSE: the min/max start is hopeless for
  LLaMA-family "massive activations" (a handful of tokens hundreds of times larger than the rest).

Rounding is round-half-to-even (what integer kernels do) with a straight-through gradient, so the
clipping logits get LSQ-style gradients through ``x / scale``; a fit with continuous approximations
(:mod:`cbq_lightning.quant.continuous`) smooths the rounding and the clamp while it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cbq_lightning.distributed import all_reduce_
from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.continuous import SmoothableQuantizer
from cbq_lightning.quant.ste import round_ste
from cbq_lightning.quant.weight_quantizer import SCALE_EPS, clip_logit

ActMode = Literal["dynamic_sym", "dynamic_asym", "static_lsq"]
ACT_MODES: tuple[str, ...] = ("dynamic_sym", "dynamic_asym", "static_lsq")

#: clipping ratios tried when a static step is initialised (1.0 = the batch's max |x|)
_STATIC_INIT_RATIOS = torch.linspace(1.0, 0.01, 100)


@dataclass(frozen=True)
class ActQuantSettings:
    """Resolved settings of the activation quantizers of a run.

    Attributes:
        bits: activation bit-width, 2..8.
        mode: ``dynamic_sym``, ``dynamic_asym`` or ``static_lsq``.
        learnable: train the clipping logit(s) / the static step; False keeps them at their start.
        clip_init: starting clipping ratio of the dynamic modes (1.0 = no clipping; must be < 1 when
            learnable, since it is a sigmoid).
    """

    bits: int
    mode: str = "dynamic_sym"
    learnable: bool = True
    clip_init: float = 0.99

    def __post_init__(self) -> None:
        if self.mode not in ACT_MODES:
            raise ConfigError(f"quant.act_mode={self.mode!r} is unknown: use one of {', '.join(ACT_MODES)}.")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"activation bits={self.bits} is out of range: use 2..8, or 16 for no quantization.")
        if self.learnable:
            clip_logit(self.clip_init, key="advanced.quant.act_clip_init")
        elif not 0.0 < self.clip_init <= 1.0:
            raise ConfigError(f"advanced.quant.act_clip_init={self.clip_init} must lie in (0, 1].")


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Value of ``x``, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


class ActivationQuantizer(SmoothableQuantizer):
    """Fake-quantizes a linear's input ``[..., features]`` (see the module docstring for the modes)."""

    def __init__(self, settings: ActQuantSettings) -> None:
        super().__init__()
        self.bits = settings.bits
        self.mode = settings.mode
        self.learnable = settings.learnable
        if self.mode == "static_lsq":
            self.qmax = 2 ** (self.bits - 1) - 1
            step = torch.ones(())
            self.step = nn.Parameter(step) if settings.learnable else None
            if self.step is None:
                self.register_buffer("fixed_step", step)
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
            return
        self.qmax = 2 ** (self.bits - 1) - 1 if self.mode == "dynamic_sym" else 2**self.bits - 1
        if settings.learnable:
            logit = torch.full((), clip_logit(settings.clip_init))
            self.upper_logit = nn.Parameter(logit.clone())
            self.lower_logit = nn.Parameter(logit.clone()) if self.mode == "dynamic_asym" else None
        else:
            self.upper_logit = self.lower_logit = None
            self.register_buffer("fixed_upper", torch.full((), float(settings.clip_init)))
            self.register_buffer("fixed_lower", torch.full((), float(settings.clip_init)))

    # --- parameters ----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the window trains (empty when not learnable)."""
        if self.mode == "static_lsq":
            return [self.step] if self.step is not None else []
        return [p for p in (self.upper_logit, self.lower_logit) if p is not None]

    def clip_ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper, lower) clipping ratios of the dynamic modes."""
        if self.upper_logit is None:
            return self.fixed_upper, self.fixed_lower
        upper = torch.sigmoid(self.upper_logit)
        lower = upper if self.lower_logit is None else torch.sigmoid(self.lower_logit)
        return upper, lower

    def current_step(self) -> torch.Tensor:
        return self.step if self.step is not None else self.fixed_step

    def summary(self) -> float:
        """One number for monitoring: the upper clipping ratio, or the static step."""
        if self.mode == "static_lsq":
            return float(self.current_step().detach())
        return float(self.clip_ratios()[0].detach())

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.mode == "dynamic_sym":
            out = self._dynamic_symmetric(x)
        elif self.mode == "dynamic_asym":
            out = self._dynamic_asymmetric(x)
        else:
            out = self._static(x)
        return out.to(dtype)

    def _dynamic_symmetric(self, x: torch.Tensor) -> torch.Tensor:
        upper, _ = self.clip_ratios()
        absmax = x.abs().amax(dim=-1, keepdim=True) * upper
        scale = (absmax / self.qmax).clamp(min=SCALE_EPS)
        q = self.smooth_or_hard_clamp(self.smooth_or_ste_round(x / scale, round_ste), -self.qmax - 1, self.qmax)
        return q * scale

    def _dynamic_asymmetric(self, x: torch.Tensor) -> torch.Tensor:
        upper, lower = self.clip_ratios()
        xmax = x.amax(dim=-1, keepdim=True).clamp(min=0.0) * upper
        xmin = x.amin(dim=-1, keepdim=True).clamp(max=0.0) * lower
        scale = ((xmax - xmin) / self.qmax).clamp(min=SCALE_EPS)
        zero = round_ste(-xmin / scale).clamp(0, self.qmax)
        q = self.smooth_or_hard_clamp(self.smooth_or_ste_round(x / scale, round_ste) + zero, 0, self.qmax)
        return (q - zero) * scale

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize_step(x)
        step = self.current_step().abs().clamp(min=SCALE_EPS)
        if self.step is not None and torch.is_grad_enabled():
            step = _grad_scale(step, (x.shape[-1] * self.qmax) ** -0.5)
        q = self.smooth_or_hard_clamp(self.smooth_or_ste_round(x / step, round_ste), -self.qmax - 1, self.qmax)
        return q * step

    @torch.no_grad()
    def initialize_step(self, x: torch.Tensor) -> float:
        """Set the static step to the grid ratio of ``max|x|`` with the least quantization MSE on ``x``."""
        x = x.detach().float().reshape(-1)
        if x.numel() > 1_000_000:  # a strided subsample keeps the search cheap on long batches
            x = x[:: x.numel() // 1_000_000 + 1]
        absmax = all_reduce_(x.abs().max().clamp(min=SCALE_EPS).reshape(1), "max")[0]  # DDP: one grid for all
        steps = (absmax * _STATIC_INIT_RATIOS.to(x.device) / self.qmax).clamp(min=SCALE_EPS)
        errors = torch.stack(
            [(torch.clamp(torch.round(x / step), -self.qmax - 1, self.qmax) * step - x).pow(2).mean() for step in steps]
        )
        all_reduce_(errors)  # every rank picks the step with the least error over all shards
        best_step = steps[int(torch.argmin(errors))]
        self.current_step().copy_(best_step)
        self.initialized.fill_(True)
        return float(best_step)

    # --- export --------------------------------------------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor]:
        """What a reloaded model needs to apply the same quantization: ratios or the static step."""
        if self.mode == "static_lsq":
            return {"act_step": self.current_step().detach().float().reshape(()).clone()}
        upper, lower = self.clip_ratios()
        return {"act_clip_upper": upper.detach().float().clone(), "act_clip_lower": lower.detach().float().clone()}

    @classmethod
    def from_export_state(cls, bits: int, mode: str, state: dict[str, torch.Tensor]) -> ActivationQuantizer:
        """A frozen quantizer that computes what the exported one computed."""
        quantizer = cls(ActQuantSettings(bits=bits, mode=mode, learnable=False, clip_init=1.0))
        with torch.no_grad():
            if mode == "static_lsq":
                quantizer.fixed_step.copy_(state["act_step"])
                quantizer.initialized.fill_(True)
            else:
                quantizer.fixed_upper.copy_(state["act_clip_upper"])
                quantizer.fixed_lower.copy_(state["act_clip_lower"])
        return quantizer

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, learnable={self.learnable}"
