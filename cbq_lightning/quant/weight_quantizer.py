"""Uniform weight quantizer with learnable clipping thresholds (docs/method.md §1).

For each output channel (or each group of ``group_size`` input features) the quantization range is
``[sigmoid(l) * min(W), sigmoid(u) * max(W)]``; the logits ``u`` and ``l`` are the trainable clipping
thresholds. Asymmetric quantization uses a zero-point; symmetric quantization fixes it at ``2**(b-1)``
(the GPTQ-v1 / compressed-tensors convention) and uses one logit.

The range always contains 0 (min is capped at 0 and max floored at 0 before clipping) so that the
zero-point is an integer in ``[0, 2**b - 1]`` and packs into the same unsigned field as the codes, which
every packed export format requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.continuous import SmoothableQuantizer
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.ste import floor_ste, round_half_up_ste
from cbq_lightning.section_types import check_field_types

#: smallest scale, so that a constant (e.g. all-zero) group does not divide by zero
SCALE_EPS = 1e-8


def clip_logit(ratio: float, key: str = "clip_init") -> float:
    """Logit whose sigmoid is the initial clipping ratio (ratio in (0, 1)); ``key`` is the setting the error names
    (the configuration passes the dotted key a user sets)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"{key}={ratio} must lie strictly between 0 and 1 when clipping is learnable "
            "(it is sigmoid(logit)); 0.99 starts almost unclipped."
        )
    return math.log(ratio / (1.0 - ratio))


@dataclass(frozen=True)
class ClipSearch:
    """Grid search of the initial clipping ratios (the GPTQ / OmniQuant-LWC style MSE initialisation).

    Starting the learnable thresholds at ~1.0 (the paper's default) leaves them on the flat tail of
    the sigmoid, where a short CPU-budget fit cannot move them far; searching each group's ratio
    that minimises ``sum |W - Q(W)|^norm`` first puts them near a good optimum for almost no cost.

    The ``extensions.clip_search`` section (null: every group starts at ``advanced.quant.clip_init``).

    Attributes:
        min_ratio: smallest ratio tried (the largest is the configured ``clip_init``).
        steps: ratios tried, evenly spaced.
        norm: exponent of the error (2.4 is GPTQ's choice: between MSE and max error).
        activation_aware: weight each weight's error by ``E[x^2]`` of the input feature it multiplies
            (measured on the calibration data), i.e. search for the least *output* error.
    """

    min_ratio: float = 0.5
    steps: int = 25
    norm: float = 2.4
    activation_aware: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "extensions.clip_search")
        if not 0.0 < self.min_ratio < 1.0 or self.steps < 2 or self.norm <= 0:
            raise ConfigError(
                f"extensions.clip_search: min_ratio={self.min_ratio}, steps={self.steps}, norm={self.norm}: need "
                "0 < min_ratio < 1, steps >= 2 and norm > 0."
            )


class WeightQuantizer(SmoothableQuantizer):
    """Computes scales/zero-points for one ``[out, in]`` weight and fake-quantizes it.

    Args:
        weight: the weight it will quantize (used for its shape and initial ranges only).
        bits: bit-width, 2..8.
        group_size: input features per scale; ``None`` for per-output-channel.
        sym: symmetric quantization.
        learnable_clip: train the clipping logits; when False the range is exactly
            ``clip_init * [min, max]`` (``clip_init=1`` is plain min/max, the RTN baseline).
        clip_init: initial clipping ratio.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int | None = None,
        sym: bool = False,
        learnable_clip: bool = True,
        clip_init: float = 0.99,
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        group = group_size or in_features
        if in_features % group != 0:
            raise ConfigError(
                f"group_size={group_size} does not divide in_features={in_features}."
            )
        self.bits = bits
        self.group_size = group_size
        self.group = group
        self.sym = sym
        #: the code range; a GGML grid narrows it (Q8_0 never stores -128: codes 1..255)
        self.qmin = 0
        self.qmax = 2**bits - 1
        self.learnable_clip = learnable_clip
        self.clip_init = clip_init
        shape = (out_features, in_features // group, 1)
        if learnable_clip:
            logit = clip_logit(clip_init)
            self.upper_logit = nn.Parameter(torch.full(shape, logit, dtype=torch.float32))
            self.lower_logit = None if sym else nn.Parameter(torch.full(shape, logit, dtype=torch.float32))
            self.fixed_ratio = 1.0
        else:
            if not 0.0 < clip_init <= 1.0:
                raise ConfigError(f"clip_init={clip_init} must lie in (0, 1].")
            self.upper_logit = None
            self.lower_logit = None
            self.fixed_ratio = clip_init

    # --- shapes -------------------------------------------------------------------------------------
    def grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """``[out, in] -> [out, in/group, group]`` (a view)."""
        return weight.reshape(weight.shape[0], -1, self.group)

    # --- ranges -------------------------------------------------------------------------------------
    def clip_ratios(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Current (upper, lower) clipping ratios."""
        if self.upper_logit is None:
            return self.fixed_ratio, self.fixed_ratio
        upper = torch.sigmoid(self.upper_logit)
        lower = upper if self.lower_logit is None else torch.sigmoid(self.lower_logit)
        return upper, lower

    def scale_zero(
        self, weight: torch.Tensor, ratios: tuple[torch.Tensor | float, torch.Tensor | float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point, each ``[out, in/group, 1]``; differentiable w.r.t. the clip logits.

        ``ratios`` overrides the (upper, lower) clipping ratios (used by the clip search). The
        zero-point is integer-valued (rounded with a straight-through gradient).
        """
        w = self.grouped(weight.float())
        upper, lower = self.clip_ratios() if ratios is None else ratios
        if self.sym:
            absmax = w.abs().amax(dim=-1, keepdim=True) * upper
            scale = (2.0 * absmax / self.qmax).clamp(min=SCALE_EPS)
            zero = torch.full_like(scale, float(2 ** (self.bits - 1)))
            return scale, zero
        wmax = w.amax(dim=-1, keepdim=True).clamp(min=0.0) * upper
        wmin = w.amin(dim=-1, keepdim=True).clamp(max=0.0) * lower
        scale = ((wmax - wmin) / self.qmax).clamp(min=SCALE_EPS)
        zero = round_half_up_ste(-wmin / scale).clamp(0, self.qmax)
        return scale, zero

    def grid(
        self, weight: torch.Tensor, ratios: tuple[torch.Tensor | float, torch.Tensor | float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(scale, zero, minimum)``, each ``[out, in/group, 1]``: :meth:`scale_zero` and, on a grid that stores a
        per-group minimum (GGML's ``_1`` types, :mod:`cbq_lightning.quant.ggml_quantizer`), that minimum; None here."""
        scale, zero = self.scale_zero(weight, ratios)
        return scale, zero, None

    @property
    def ggml_name(self) -> str | None:
        """The GGML block type whose grid this is (``Q4_K`` ...), None for cbq-lightning's own grid."""
        return None

    def super_scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A grid's second-level scales (GGML's K-quants: float16 ``d`` and ``dmin`` per super-block of 256, from
        which the sub-block scales are integer multiples), or None on a one-level grid such as this one."""
        return None

    def code_units(self, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
        """``W/s`` grouped (``[out, in/group, group]``), or ``(W - m)/s`` on a grid with a minimum: what is rounded."""
        w = self.grouped(weight.float())
        return (w if minimum is None else w - minimum) / scale

    @staticmethod
    def dequantize_codes(
        q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, minimum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``s * (q - z)``, or ``s * q + m`` on a grid with a minimum (GGML's ``d * q + m``, in that order of
        float32 operations, so the result is bit-exactly what a GGUF reader dequantizes)."""
        return scale * (q - zero) if minimum is None else scale * q + minimum

    # --- quantization -------------------------------------------------------------------------------
    def codes(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        rounding: torch.Tensor | None,
        offset: torch.Tensor | None = None,
        minimum: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integer codes (as float, straight-through) ``clamp(floor(W/s + offset) + h + z, qmin, qmax)``.

        ``rounding`` is the rounding decision ``h`` in [0, 1] with the weight's ``[out, in]`` shape; ``None``
        means round-to-nearest, ``round(W/s + offset)``. ``offset`` (``[out, in]``, default 0) is added to
        ``W/s`` first: GPTQ's whole-number shift, plus a learned signed offset in [-0.5, 0.5] in the offset
        form. In a fit with continuous approximations (:mod:`cbq_lightning.quant.continuous`) the rounding
        that is not learned and the clamp are the smooth ones while training. With a ``minimum`` (see
        :meth:`grid`) ``W - m`` is rounded instead of ``W``.
        """
        x = self.code_units(weight, scale, minimum)
        if offset is not None:
            x = x + self.grouped(offset)
        if rounding is not None:
            q = floor_ste(x) + self.grouped(rounding)
        else:  # rounding not learned by LoRA-Rounding: the continuous approximation may stand in for the STE
            q = self.smooth_or_ste_round(x, round_half_up_ste)
        return self.smooth_or_hard_clamp(q + zero, self.qmin, self.qmax)

    def fake_quantize(
        self,
        weight: torch.Tensor,
        rounding: torch.Tensor | None = None,
        ratios: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``W_hat = s * (clamp(floor(W/s) + h + z, 0, 2^b-1) - z)``, same shape as ``weight`` (fp32).

        ``ratios`` overrides the clipping ratios (see :meth:`scale_zero`); ``offset`` is a signed rounding
        offset (see :meth:`codes`).
        """
        scale, zero, minimum = self.grid(weight, ratios)
        q = self.codes(weight, scale, zero, rounding, offset, minimum)
        return self.dequantize_codes(q, scale, zero, minimum).reshape(weight.shape)

    @torch.no_grad()
    def search_clip(
        self, weight: torch.Tensor, search: ClipSearch, input_moments: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Set the clipping logits to each group's best ratio by grid search; returns the ratios.

        Both ends shrink by the same ratio (the GPTQ convention); the learned fit may then move them apart.
        ``input_moments`` (``E[x_j^2]`` per input feature, ``[in]``) weights each weight's error by what it
        multiplies, so the search minimises the output error rather than the weight error.
        """
        if self.upper_logit is None:
            raise ConfigError("the clip search sets learnable thresholds: enable quant.learnable_clip.")
        weight = weight.float()
        device = weight.device
        weights = None if input_moments is None else self.grouped(input_moments.float().reshape(1, -1).to(device))
        start = self.clip_init
        best_error = torch.full(self.upper_logit.shape, float("inf"), device=device)
        best_ratio = torch.full(self.upper_logit.shape, start, device=device)
        for ratio in torch.linspace(start, min(search.min_ratio, start), search.steps).tolist():
            error = self.grouped(self.fake_quantize(weight, ratios=(ratio, ratio)) - weight).abs().pow(search.norm)
            error = (error if weights is None else error * weights).sum(dim=-1, keepdim=True)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        logits = torch.log(best_ratio / (1.0 - best_ratio))
        self.upper_logit.copy_(logits)
        if self.lower_logit is not None:
            self.lower_logit.copy_(logits)
        return best_ratio

    def fractional_part(self, weight: torch.Tensor) -> torch.Tensor:
        """``frac(W/s)`` (``frac((W - m)/s)`` with a minimum) at the current scale, ``[out, in]``: what LoRA-Rounding starts from."""
        with torch.no_grad():
            scale, _, minimum = self.grid(weight)
            x = self.code_units(weight, scale, minimum)
            return (x - torch.floor(x)).reshape(weight.shape)


def build_weight_quantizer(
    weight: torch.Tensor, scheme: QuantScheme, learnable_clip: bool = True, clip_init: float = 0.99
) -> WeightQuantizer:
    """The quantizer of ``scheme`` for ``weight``: cbq-lightning's own grid, or a GGML type's exact one."""
    if scheme.gguf_type is not None:
        # imported here: the GGML quantizer subclasses this module's class
        from cbq_lightning.quant.ggml_quantizer import GGMLWeightQuantizer

        return GGMLWeightQuantizer(weight, scheme.ggml, learnable_clip, clip_init)
    return WeightQuantizer(weight, scheme.w_bits, scheme.group_size, scheme.sym, learnable_clip, clip_init)
