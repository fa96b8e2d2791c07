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

* the K-quants (``Q2_K`` ... ``Q6_K``): each sub-block's float scale (and minimum) follows its clipping as above;
  then, per super-block of 256, ``d = max / levels`` is rounded to float16 and each sub-block's scale to the integer
  ``sc = round(scale / d)`` the format stores (4, 6 or 8 bits), both with straight-through gradients, so the
  sub-block's grid is ``d * sc`` (and ``-dmin * m``) exactly as the file holds it. ``Q3_K`` / ``Q6_K`` take each
  sub-block's scale with the sign of its largest-magnitude weight and ``d`` with the sign of the largest scale (the
  rule of llama.cpp's reference quantizer); the minimum of ``Q2_K`` / ``Q4_K`` / ``Q5_K`` is at most 0 (the format
  stores ``-min`` as an unsigned integer).

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


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half away from zero, as llama.cpp's ``nearest_int``) with the gradient of ``x``."""
    rounded = torch.sign(x.detach()) * torch.floor(x.detach().abs() + 0.5)
    return x + (rounded - x.detach())


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

    @property
    def ggml_name(self) -> str | None:
        return self.block_type.name

    def super_scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A K-quant's float16 super-block scale ``d`` (and ``dmin``), each ``[out, in / 256]``, at the current
        clipping: what the file stores beside the integer sub-block scales. None for the legacy types."""
        if not self.block_type.is_k_quant:
            return None
        upper, lower = self.clip_ratios()
        _, _, _, d, dmin = self._k_grid(self.grouped(weight.float()), upper, lower)
        return d.reshape(d.shape[0], -1), None if dmin is None else dmin.reshape(dmin.shape[0], -1)

    def grid(
        self, weight: torch.Tensor, ratios: tuple[torch.Tensor | float, torch.Tensor | float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(d, zero, m)`` per block, ``[out, in/32, 1]``: ``d`` and ``m`` are float16 values (as float32)."""
        w = self.grouped(weight.float())
        upper, lower = self.clip_ratios() if ratios is None else ratios
        block = self.block_type
        if block.is_k_quant:
            scale, zero, minimum, _, _ = self._k_grid(w, upper, lower)
            return scale, zero, minimum
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

    def _by_super_block(self, per_sub_block: torch.Tensor) -> torch.Tensor:
        """``[out, in/sub, 1] -> [out, in/256, 256/sub]``: the sub-block values of each super-block side by side."""
        per_super = self.block_type.row_multiple // self.block_type.sub_block
        return per_sub_block.reshape(per_sub_block.shape[0], -1, per_super)

    def _k_grid(
        self, w: torch.Tensor, upper: torch.Tensor | float, lower: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """A K-quant's ``(scale, zero, minimum)`` per sub-block (``[out, in/sub, 1]``) and its float16 ``d`` / ``dmin``
        per super-block (``[out, in/256, 1]``; ``dmin`` None for the symmetric ``Q3_K`` / ``Q6_K``)."""
        block = self.block_type
        levels = block.scale_levels
        if block.minimum:
            low = w.amin(dim=-1, keepdim=True).clamp(max=0.0) * lower
            high = w.amax(dim=-1, keepdim=True) * upper
            float_scale = ((high - low) / block.scale_divisor).clamp(min=FLOAT16_TINY)
            d, sc = self._two_level(float_scale, levels, smallest=1)
            dmin, m = self._two_level(-low, levels, smallest=0)
            scale = (d * sc).reshape(float_scale.shape)
            minimum = -(dmin * m).reshape(float_scale.shape)
            return scale, torch.zeros_like(scale), minimum, d, dmin
        extreme = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))
        float_scale = self._by_super_block(extreme * upper / block.scale_divisor)
        largest = torch.gather(float_scale, -1, float_scale.abs().argmax(dim=-1, keepdim=True))
        d = float16_ste(_away_from_zero(largest / -levels))
        ratio = float_scale / d
        hard = torch.sign(ratio.detach()) * torch.floor(ratio.detach().abs() + 0.5)
        hard = hard.clamp(-levels, levels - 1)
        # a sub-block scale of 0 would zero the sub-block and divide by 0 when rounding: the smallest step instead
        hard = torch.where(hard == 0, torch.where(ratio.detach() < 0, -1.0, 1.0), hard)
        sc = ratio + (hard - ratio.detach())
        scale = (d * sc).reshape(w.shape[0], -1, 1)
        return scale, torch.full_like(scale, float(block.zero)), None, d, None

    def _two_level(self, values: torch.Tensor, levels: int, smallest: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-negative sub-block values on a super-block's grid: ``d = max / levels`` as float16, and the integers
        ``round(value / d)`` in ``smallest..levels`` (straight-through), each ``[out, in/256, ...]``."""
        grouped = self._by_super_block(values)
        d = float16_ste((grouped.amax(dim=-1, keepdim=True) / levels).clamp(min=FLOAT16_TINY))
        return d, _round_ste(grouped / d).clamp(smallest, levels)
