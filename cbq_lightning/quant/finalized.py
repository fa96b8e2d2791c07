"""The quantized linear after calibration: integer codes and the dequantized weight, nothing trainable.

Why a module of its own: a calibrating :class:`~cbq_lightning.quant.qlinear.QuantLinear` carries the rounding,
clipping, GPTQ start and activation quantizer that training needs; once a window finalises it, only the stored
integers and what the forward needs remain, and this class is what checkpoints, exports and evaluation read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbq_lightning.quant.act_quantizer import ActivationQuantizer
from cbq_lightning.quant.correction import LowRankCorrection
from cbq_lightning.quant.weight_quantizer import WeightQuantizer


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act_quantizer: ActivationQuantizer | None,
    correction: LowRankCorrection | None,
) -> torch.Tensor:
    """The forward of both lives of a quantized linear: ``weight`` (fake-quantized or dequantized) on the
    activation-quantized input, plus the correction on the unquantized input."""
    unquantized = x
    if act_quantizer is not None:
        x = act_quantizer(x)
    out = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if correction is not None:
        out = out + correction(unquantized)
    return out


class FinalizedQuantLinear(nn.Module):
    """A quantized linear after calibration: integer codes, scales and zero-points, and the dequantized weight
    its forward uses. Nothing in it trains, except its scales during the optional end-to-end phase
    (:meth:`begin_scale_training`; :mod:`cbq_lightning.end_to_end`), which never touches the codes.

    Its state dict holds ``weight`` (dequantized, the model's dtype), ``bias`` (if any), ``qweight`` (uint8
    codes ``[out, in]``), ``scales`` (float32 ``[out, in / group]``), ``zeros`` (uint8), ``mins`` (float32, GGML's
    ``_1`` types only), and the frozen
    ``act_quantizer.*`` / ``correction.*`` when the run has them: what the window checkpoints store and
    ``quant_state.safetensors`` is collected from.

    Args:
        codes: integer codes, ``[out, in]`` uint8.
        scales: ``[out, in / group]`` float32.
        zeros: zero-points, ``[out, in / group]`` uint8.
        mins: per-group minimums, ``[out, in / group]`` float32, on a grid that stores them (GGML's ``_1`` types
            and ``Q2_K`` / ``Q4_K`` / ``Q5_K``: ``weight = scale * q + min``); None: ``weight = scale * (q - zero)``.
        super_scales, super_mins: a GGML K-quant's float16 ``d`` / ``dmin`` per super-block of 256 (``[out, in /
            256]`` float32), of which the sub-block ``scales`` / ``-mins`` are integer multiples; None otherwise.
        ggml_type: the GGML block type the layer was calibrated on (``Q4_K`` ...), None on cbq-lightning's grid.
        bits, group_size, sym: the grid (``group_size`` None: per channel).
        bias: the layer's bias or None.
        dtype: dtype of the dequantized weight (the model's).
        act_quantizer: frozen activation quantizer of the layer's input, or None.
        correction: frozen low-rank correction on the unquantized input, or None.
        flip_fraction: share of decisions that differ from round-to-nearest (None when rounding was not
            learned and did not start from GPTQ): a monitoring signal, not saved.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        *,
        mins: torch.Tensor | None = None,
        super_scales: torch.Tensor | None = None,
        super_mins: torch.Tensor | None = None,
        ggml_type: str | None = None,
        bits: int,
        group_size: int | None,
        sym: bool,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        act_quantizer: ActivationQuantizer | None = None,
        correction: LowRankCorrection | None = None,
        flip_fraction: float | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.flip_fraction = flip_fraction
        self.register_buffer("weight", torch.empty(0, device=codes.device))  # set below, first in the state dict
        self.register_buffer("bias", bias)
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("mins", mins)
        self.register_buffer("super_scales", super_scales)
        self.register_buffer("super_mins", super_mins)
        self.ggml_type = ggml_type
        self.weight = self.dequantized_weight().to(dtype)
        self.act_quantizer = act_quantizer
        self.correction = correction
        #: log of a multiplicative gain on every scale while the end-to-end phase trains them; None otherwise
        self.register_parameter("scale_log_gain", None)

    def dequantized_weight(self, scales: torch.Tensor | None = None) -> torch.Tensor:
        """``scale * (q - zero)`` (``scale * q + min`` with minimums) from the stored integer state (or the given
        ``scales``, differentiably), ``[out, in]`` fp32."""
        group = self.group_size or self.in_features
        q = self.qweight.float().reshape(self.out_features, -1, group)
        mins = None if self.mins is None else self.mins.unsqueeze(-1)
        scales = self.scales if scales is None else scales
        w = WeightQuantizer.dequantize_codes(q, scales.unsqueeze(-1), self.zeros.float().unsqueeze(-1), mins)
        return w.reshape(self.out_features, self.in_features)

    @property
    def scales_trainable(self) -> bool:
        """Whether the scales can move alone: not on a grid that ties them to a super-block's integer multiples
        or stores a minimum beside them (GGML's ``_1`` and K-quant types)."""
        return self.mins is None and self.super_scales is None

    def begin_scale_training(self) -> nn.Parameter:
        """Make every scale trainable as ``scale * exp(g)``, ``g`` starting at 0; the codes stay as they are.

        With the codes fixed a group's scale is its clipping range over its levels, so a gain on it is a gain on
        the group's clipping threshold."""
        if not self.scales_trainable:
            raise ValueError(f"{self.ggml_type}: the scales are tied to the grid's super-blocks and cannot train")
        self.scale_log_gain = nn.Parameter(torch.zeros_like(self.scales))
        return self.scale_log_gain

    @torch.no_grad()
    def end_scale_training(self, keep: bool) -> None:
        """Fold the trained gains into the stored scales and the dequantized weight (``keep``), or drop them."""
        gain = self.scale_log_gain
        self.scale_log_gain = None
        if keep and gain is not None:
            self.scales = self.scales * gain.detach().to(self.scales).exp()
            self.weight = self.dequantized_weight().to(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.scale_log_gain is not None:
            weight = self.dequantized_weight(self.scales * self.scale_log_gain.exp())
        return quantized_linear(x, weight, self.bias, self.act_quantizer, self.correction)

    def correction_parameter_count(self) -> int:
        """Full-precision parameters the correction adds to the layer (0 without one)."""
        return 0 if self.correction is None else sum(p.numel() for p in self.correction.parameters())

    def extra_repr(self) -> str:
        group = self.group_size or "channel"
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={group}, finalised"
