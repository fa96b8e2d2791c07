"""The weight quantizer on a GGML block type's exact grid (``Q4_0`` ... ``Q8_0``, :mod:`cbq_lightning.quant.ggml_types`).

Why a subclass: a GGUF stores per block of 32 weights a float16 scale (and, for the ``_1`` types, a float16
minimum instead of an integer zero-point), and each format puts its extreme weight on a particular code. If CBQ
calibrated on its own grid, the export would have to re-quantize and lose part of what the fit found. Here the
learnable clipping acts on the quantities the file stores:

* the scale (and minimum) are rounded to float16 in the forward, with a straight-through gradient to the
  clipping logits, so the fake-quantized weight is bit-for-bit what llama.cpp dequantizes (``d * (q - z)`` or
  ``d * q + m`` in float32);
* ``Q4_0``/``Q5_0``: ``d = ratio * x / -8`` (``/ -16``) with ``x`` the block's largest-magnitude weight *with its
  sign*, as llama.cpp's reference quantizer (at ratio 1 that weight sits on the lowest code, which the other
  side of the grid lacks); ``Q8_0``: ``d = ratio * max|w| / 127`` and codes ``-127..127``;
* ``Q4_1``/``Q5_1``: ``m = lower * min``, ``d = (upper * max - m) / qmax``; the minimum is a float, so it is not
  capped at 0 (unlike the integer zero-point of cbq-lightning's own asymmetric grid).

LoRA-Rounding, the rounding offset and GPTQ act on the codes of this grid through the base class's
``grid`` / ``code_units`` / ``codes`` (the minimum is subtracted before rounding).
"""

from __future__ import annotations

import torch

from cbq_lightning.quant.ggml_types import FLOAT16_MAX, FLOAT16_TINY, GGMLBlockType
from cbq_lightning.quant.weight_quantizer import WeightQuantizer


def float16_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 (clamped to its finite range), as float32, with the gradient of ``x``.

    Written ``r + (x - x.detach())`` so the forward value is exactly the float16 number (the added term is 0).
    """
    rounded = x.detach().clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).to(x.dtype)
    return rounded + (x - x.detach())


def _away_from_zero(d: torch.Tensor) -> torch.Tensor:
    """``d`` with magnitude at least the smallest float16 (a block of zeros must not divide by 0), sign kept."""
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return sign * d.abs().clamp(min=FLOAT16_TINY)


class GGMLWeightQuantizer(WeightQuantizer):
    """A :class:`WeightQuantizer` whose grid is ``block_type``'s (blocks of 32 along the input dimension).

    Args:
        weight: the ``[out, in]`` weight it will quantize (``in`` a multiple of 32).
        block_type: the GGML type.
        learnable_clip: train the clipping logits (one for the ``_0`` types, upper and lower for the ``_1`` types).
        clip_init: initial clipping ratio.
    """

    def __init__(
        self, weight: torch.Tensor, block_type: GGMLBlockType, learnable_clip: bool = True, clip_init: float = 0.99
    ) -> None:
        super().__init__(weight, block_type.bits, block_type.block_size, block_type.symmetric, learnable_clip, clip_init)
        self.block_type = block_type
        self.qmin = block_type.qmin
        self.qmax = block_type.qmax

    def scale_zero(
        self, weight: torch.Tensor, ratios: tuple[torch.Tensor | float, torch.Tensor | float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero, _ = self.grid(weight, ratios)
        return scale, zero

    def grid(
        self, weight: torch.Tensor, ratios: tuple[torch.Tensor | float, torch.Tensor | float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(d, zero, m)`` per block, ``[out, in/32, 1]``: ``d`` and ``m`` are float16 values (as float32)."""
        w = self.grouped(weight.float())
        upper, lower = self.clip_ratios() if ratios is None else ratios
        block = self.block_type
        if block.minimum:
            minimum = float16_ste(w.amin(dim=-1, keepdim=True) * lower)
            top = w.amax(dim=-1, keepdim=True) * upper
            scale = float16_ste(((top - minimum) / block.scale_divisor).clamp(min=FLOAT16_TINY))
            return scale, torch.zeros_like(scale), minimum
        if block.signed_scale:
            extreme = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))
        else:
            extreme = w.abs().amax(dim=-1, keepdim=True)
        scale = float16_ste(_away_from_zero(extreme * upper / block.scale_divisor))
        return scale, torch.full_like(scale, float(block.zero)), None
