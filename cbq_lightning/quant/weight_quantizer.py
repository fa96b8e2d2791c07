"""Uniform weight quantizer with learnable clipping thresholds (METHOD.md §1).

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

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.ste import floor_ste, round_half_up_ste

#: smallest scale, so that a constant (e.g. all-zero) group does not divide by zero
SCALE_EPS = 1e-8


def clip_logit(ratio: float) -> float:
    """Logit whose sigmoid is the initial clipping ratio (ratio in (0, 1))."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"clip_init={ratio} must lie strictly between 0 and 1 when clipping is learnable "
            "(it is sigmoid(logit)); 0.99 starts almost unclipped."
        )
    return math.log(ratio / (1.0 - ratio))


class WeightQuantizer(nn.Module):
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
        self.qmax = 2**bits - 1
        self.learnable_clip = learnable_clip
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

    def scale_zero(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point, each ``[out, in/group, 1]``; differentiable w.r.t. the clip logits.

        The zero-point is integer-valued (rounded with a straight-through gradient).
        """
        w = self.grouped(weight.float())
        upper, lower = self.clip_ratios()
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

    # --- quantization -------------------------------------------------------------------------------
    def codes(
        self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, rounding: torch.Tensor | None
    ) -> torch.Tensor:
        """Integer codes (as float, straight-through) ``clamp(floor(W/s) + h + z, 0, 2^b-1)``.

        ``rounding`` is the rounding decision ``h`` in [0, 1] with the weight's ``[out, in]`` shape; ``None``
        means round-to-nearest.
        """
        x = self.grouped(weight.float()) / scale
        if rounding is None:
            q = round_half_up_ste(x)
        else:
            q = floor_ste(x) + self.grouped(rounding)
        return torch.clamp(q + zero, 0, self.qmax)

    def fake_quantize(self, weight: torch.Tensor, rounding: torch.Tensor | None = None) -> torch.Tensor:
        """``W_hat = s * (clamp(floor(W/s) + h + z, 0, 2^b-1) - z)``, same shape as ``weight`` (fp32)."""
        scale, zero = self.scale_zero(weight)
        q = self.codes(weight, scale, zero, rounding)
        return (scale * (q - zero)).reshape(weight.shape)

    def fractional_part(self, weight: torch.Tensor) -> torch.Tensor:
        """``frac(W/s)`` at the current scale, ``[out, in]``: what LoRA-Rounding starts from."""
        with torch.no_grad():
            scale, _ = self.scale_zero(weight)
            x = self.grouped(weight.float()) / scale
            return (x - torch.floor(x)).reshape(weight.shape)
