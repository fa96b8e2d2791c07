"""The quantized linear layers used inside blocks: one class per life of a layer.

* :class:`QuantLinear` - **calibrating**: holds the full-precision weight (a frozen buffer), a
  :class:`WeightQuantizer` with learnable clipping logits and its rounding form, a
  :class:`~cbq_lightning.quant.rounding.Rounding`: :class:`LoRARounding` (soft decisions), :class:`RoundingOffset`
  (hard decisions, straight-through) or :class:`NearestRounding`. Its forward uses the
  fake-quantized weight, so gradients reach exactly those parameters.
* :class:`FinalizedQuantLinear` - **finalised**: integer codes, scales and zero-points; ``weight`` is the
  dequantized weight ``scale * (q - zero)`` and nothing is trainable. This is what is saved and exported.
  :meth:`QuantLinear.finalize` builds it; :func:`cbq_lightning.quant.convert.finalize_block` swaps it in.

Two classes instead of one with a ``finalized`` flag, so that no method has to ask which life it is in and a
finalised layer cannot carry a stale quantizer or rounding state.

With an activation scheme (``W4A8`` ...) an :class:`ActivationQuantizer` fake-quantizes the layer's input
in both lives; its clipping logit(s) / step train with the window and are frozen at finalisation. A
:class:`LowRankCorrection` (``extensions.correction.rank``) adds ``U V^T x`` on the unquantized input in both lives; it
trains with the window and is frozen, not folded, at finalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from cbq_lightning.quant.act_quantizer import ActivationQuantizer, ActQuantSettings
from cbq_lightning.quant.correction import CorrectionConfig, LowRankCorrection
from cbq_lightning.quant.finalized import FinalizedQuantLinear, quantized_linear
from cbq_lightning.quant.gptq import GPTQInit, GPTQResult, gptq_quantize
from cbq_lightning.quant.rounding import (
    LoRARounding,
    NearestRounding,
    Rounding,
    RoundingConfig,
    RoundingOffset,
    RoundingTuning,
    column_scale_from_moments,
)
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import ClipSearch, WeightQuantizer, build_weight_quantizer


@dataclass(frozen=True)
class LayerQuantConfig:
    """How a linear layer is quantized, resolved once from the run's configuration and passed whole (as
    torchao's ``quantize_(model, config)`` passes one config), instead of a dozen loose arguments per call.

    Attributes:
        scheme: bits / group size / symmetry (a mixed-precision run or a llama.cpp mix gives each layer its own: :meth:`with_scheme`).
        rounding: LoRA-Rounding settings; ``rounding.enabled=False`` rounds to nearest.
        learnable_clip: train the clipping thresholds.
        clip_init: initial clipping ratio.
        clip_search: search each group's initial clipping ratio (learnable clipping only).
        act: activation quantization of the layer's input; None keeps activations in floating point.
        gptq: start the rounding from GPTQ's codes on the (searched) grid, computed from the layer's input
            Hessian. Kept as a frozen whole-number shift ``rounding_base`` added to ``W/s`` before rounding. With
            LoRA-Rounding (``rounding.form: residual``) GPTQ's error-compensated values also set ``V0``: the soft
            weight starts at GPTQ's compensated weight and hardening the untrained layer gives exactly GPTQ's
            codes (see :meth:`QuantLinear._gptq_soft_start`); with ``offset`` the learned offset sits on top.
        correction: a trainable low-rank correction on the unquantized input (None: none), started
            from the layer's starting weight error (see :mod:`cbq_lightning.quant.correction`).
        column_scale: exponent of the LoRA term's fixed per-input-column scale (``extensions.column_scale``;
            0: none, the paper).
        rounding_tuning: LoRA-Rounding's finer settings (``advanced.rounding``: the factors' starting scale).
        rounding_forward: LoRA-Rounding's training forward, ``soft`` or ``hardened`` (``extensions.rounding_forward``).
    """

    scheme: QuantScheme
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    learnable_clip: bool = True
    clip_init: float = 0.99
    clip_search: ClipSearch | None = None
    act: ActQuantSettings | None = None
    gptq: GPTQInit | None = None
    correction: CorrectionConfig | None = None
    column_scale: float = 0.0
    rounding_tuning: RoundingTuning = field(default_factory=RoundingTuning)
    rounding_forward: str = "soft"

    @property
    def activation_aware(self) -> bool:
        """The clip search weighs each weight's error by its input feature's ``E[x^2]``
        (``extensions.clip_search.activation_aware``), so the run collects the layers' input second moments."""
        return self.clip_search is not None and self.clip_search.activation_aware

    @property
    def needs_input_moments(self) -> bool:
        """The layers are built with their inputs' ``E[x_j^2]``: for an activation-aware clip search, or for the
        LoRA term's column scale (``extensions.column_scale``)."""
        return self.activation_aware or (self.rounding.enabled and bool(self.column_scale))

    def with_scheme(self, scheme: QuantScheme) -> LayerQuantConfig:
        """The same quantization on another scheme (a layer of a mixed-precision run, or of a llama.cpp mix)."""
        return replace(self, scheme=scheme)


class QuantLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` with fake-quantized weights, while its window calibrates.

    Args:
        linear: the layer to replace (its weight is copied, not shared).
        config: how it is quantized (:class:`LayerQuantConfig`).
        generator: random source of the rounding factors.
        input_moments: ``E[x_j^2]`` of this layer's inputs, ``[in]``: makes the clip search activation-aware.
        hessian: ``E[x x^T]`` of this layer's inputs, ``[in, in]`` (GPTQ only).
    """

    def __init__(
        self,
        linear: nn.Linear,
        config: LayerQuantConfig,
        generator: torch.Generator | None = None,
        input_moments: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        scheme, rounding, gptq, act, correction = config.scheme, config.rounding, config.gptq, config.act, config.correction
        learnable_clip, clip_init, clip_search = config.learnable_clip, config.clip_init, config.clip_search
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bits = scheme.w_bits
        self.group_size = scheme.group_size
        self.sym = scheme.sym
        self.scheme = scheme
        weight = linear.weight.detach().clone()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.quantizer: WeightQuantizer | None = build_weight_quantizer(weight, scheme, learnable_clip, clip_init)
        if clip_search is not None:
            self.quantizer.search_clip(weight, clip_search, input_moments if config.activation_aware else None)
        self.register_buffer("rounding_base", None)
        soft_rounding = rounding.enabled and rounding.form != "offset"
        frac: torch.Tensor | None = None
        if gptq is not None:
            rounding.check_gptq_start()
            if hessian is None:
                raise ValueError("GPTQ initialisation needs the layer's input Hessian E[x x^T]")
            if soft_rounding:
                self.rounding_base, frac = self._gptq_soft_start(hessian, gptq)
            else:
                self.rounding_base = self._gptq_offset(hessian, gptq)
        self.rounding: Rounding = NearestRounding()
        if rounding.enabled and rounding.form == "offset":
            self.rounding = RoundingOffset(tuple(weight.shape))
        elif soft_rounding:
            frac = self.quantizer.fractional_part(weight) if frac is None else frac
            self.rounding = LoRARounding(
                frac, rounding.rank_for(*weight.shape), rounding.form, config.rounding_tuning.init_std, generator,
                self._column_scale(config.column_scale, input_moments), hardened=config.rounding_forward == "hardened",
            )
        self.act_quantizer: ActivationQuantizer | None = None if act is None else ActivationQuantizer(act)
        #: forward with hardened (0/1) rounding decisions instead of soft ones, to measure what
        #: finalisation would give without finalising
        self.use_hard_rounding = False
        self.correction: LowRankCorrection | None = None
        if correction is not None:
            rank = correction.rank_for(self.out_features, self.in_features)
            error = self.starting_weight_error() if correction.init == "svd" else None
            self.correction = LowRankCorrection(self.out_features, self.in_features, rank, error).to(weight.device)

    def _column_scale(self, alpha: float, input_moments: torch.Tensor | None) -> torch.Tensor | None:
        """The LoRA term's per-column scale (``extensions.column_scale``, exponent ``alpha``), or None when off.
        Without moments it is a placeholder of ones: only :meth:`BlockQuantizer.structure` builds a layer so, and
        resume loads the saved scale into it."""
        if not alpha:
            return None
        if input_moments is None:
            return torch.ones(self.in_features)
        return column_scale_from_moments(input_moments, alpha)

    @torch.no_grad()
    def starting_weight_error(self) -> torch.Tensor:
        """``W - Q(W)`` with the current grid and hardened rounding decisions, ``[out, in]`` fp32."""
        hard, self.use_hard_rounding = self.use_hard_rounding, True
        try:
            return self.weight.float() - self.fake_weight().float()
        finally:
            self.use_hard_rounding = hard

    @torch.no_grad()
    def _gptq(
        self, hessian: torch.Tensor, settings: GPTQInit
    ) -> tuple[WeightQuantizer, GPTQResult, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """GPTQ on the layer's current grid: the quantizer, GPTQ's result, and the grid's scales, zeros and
        per-group minimums (None on a grid without them).

        On a grid with a per-group minimum (GGML's ``_1`` types) GPTQ rounds ``W - m`` with zero-point 0: the
        minimum is constant within a group, so the error it compensates is the same.
        """
        assert self.quantizer is not None
        quantizer = self.quantizer
        scale, zero, minimum = quantizer.grid(self.weight)
        weight = self.weight if minimum is None else (quantizer.grouped(self.weight.float()) - minimum).reshape(self.weight.shape)
        result = gptq_quantize(
            weight, hessian.to(self.weight.device), scale, zero, quantizer.qmax, quantizer.group, settings,
            qmin=quantizer.qmin,
        )
        return quantizer, result, scale, zero, minimum

    @torch.no_grad()
    def _gptq_offset(self, hessian: torch.Tensor, settings: GPTQInit) -> torch.Tensor:
        """GPTQ's codes minus round-to-nearest's on the current grid, ``[out, in]`` (whole numbers).

        An integer shift, not ``codes - z - W/s``: with it ``W/s + shift`` keeps the fractional part of
        ``W/s``, so a learned offset in [-0.5, 0.5] can still move a decision to the neighbouring code of
        GPTQ's (from an exactly integer value it never could), and when the learned clipping moves the grid
        the codes follow the weight as round-to-nearest's do, carrying GPTQ's correction along.
        """
        quantizer, result, scale, zero, minimum = self._gptq(hessian, settings)
        codes = result.codes
        x = quantizer.code_units(self.weight, scale, minimum)
        nearest = torch.floor(x + 0.5) + zero  # not clamped: the shift must land on GPTQ's code exactly
        return (quantizer.grouped(codes.float()) - nearest).reshape(self.weight.shape)

    @torch.no_grad()
    def _gptq_soft_start(self, hessian: torch.Tensor, settings: GPTQInit) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ as the start of LoRA-Rounding: a whole-number shift and the fractional parts ``V0`` holds.

        GPTQ rounds the compensated value ``t = w'/s`` of each weight (its own value plus the corrections of
        the columns rounded before it) to nearest. With ``shift = floor(t) - floor(W/s)`` and
        ``h(V0) = frac(t)``, the soft code ``floor(W/s) + shift + h(V0)`` is ``t`` itself, so the soft layer
        starts at GPTQ's compensated weight, and the hardened one, ``floor(t) + 1[frac(t) >= 0.5]``, at
        GPTQ's codes. Fractions within ``1e-3`` of 0.5 are moved to GPTQ's side of it, so float rounding in
        ``h(V0)`` cannot flip a decision. LoRA-Rounding then learns where GPTQ's decisions should change.
        """
        quantizer, result, scale, _, minimum = self._gptq(hessian, settings)
        x = quantizer.code_units(self.weight, scale, minimum)
        target = quantizer.grouped(result.targets.float())
        shift = torch.floor(target) - torch.floor(x)
        frac = target - torch.floor(target)
        up = frac >= 0.5
        frac = torch.where(up, frac.clamp(min=0.5 + 1e-3), frac.clamp(max=0.5 - 1e-3))
        return shift.reshape(self.weight.shape), frac.reshape(self.weight.shape)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # a layer rebuilt for resume has no GPTQ shift yet (it is computed from data, not from the layout):
        # take the saved one's shape so the saved values load into it
        key = prefix + "rounding_base"
        if key in state_dict and self.rounding_base is None:
            self.rounding_base = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- calibration ---------------------------------------------------------------------------------
    def signed_offset(self) -> torch.Tensor | None:
        """The signed rounding offset added to ``W/s`` before rounding: GPTQ's frozen whole-number shift plus
        the learned offset (``offset`` form), either alone, or None (round-to-nearest, or LoRA-Rounding from
        round-to-nearest)."""
        learned = self.rounding.offset()
        if self.rounding_base is None:
            return learned
        return self.rounding_base if learned is None else self.rounding_base + learned

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight of the forward, with the rounding form's decisions (hard ones while
        :attr:`use_hard_rounding` measures what finalising would give) and offset."""
        assert self.quantizer is not None
        decisions = self.rounding.decisions(hard=self.use_hard_rounding)
        return self.quantizer.fake_quantize(self.weight, decisions, offset=self.signed_offset())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.fake_weight(), self.bias, self.act_quantizer, self.correction)

    def rounding_parameters(self) -> list[nn.Parameter]:
        # LoRA-Rounding's A1, A2 or the offset's V (LoRA-Rounding's V0 is a frozen buffer, not a parameter)
        return list(self.rounding.parameters())

    def clip_parameters(self) -> list[nn.Parameter]:
        if self.quantizer is None:
            return []
        return [p for p in (self.quantizer.upper_logit, self.quantizer.lower_logit) if p is not None]

    def act_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the activation quantizer (empty when weight-only)."""
        if self.act_quantizer is None:
            return []
        return self.act_quantizer.trainable_parameters()

    def correction_parameters(self) -> list[nn.Parameter]:
        """``U`` and ``V`` of the low-rank correction (empty without one)."""
        if self.correction is None:
            return []
        return list(self.correction.parameters())

    def rounding_regularizer(self, beta: float) -> torch.Tensor | None:
        return self.rounding.regularizer(beta)

    def mean_clip_ratio(self) -> float:
        """Average upper clipping ratio (1.0 = unclipped): a monitoring signal."""
        if self.quantizer is None:
            return float("nan")
        upper, _ = self.quantizer.clip_ratios()
        return float(upper.detach().mean()) if torch.is_tensor(upper) else float(upper)

    @torch.no_grad()
    def reset_to_round_to_nearest(self) -> None:
        """Forget what training learned: min/max range, round-to-nearest, untrained activation clipping.

        The divergence guard's fallback for a window that kept diverging; ``finalize`` then stores RTN codes.
        """
        self.quantizer = build_weight_quantizer(self.weight, self.scheme, learnable_clip=False, clip_init=1.0)
        self.rounding = NearestRounding()
        self.rounding_base = None
        if self.act_quantizer is not None:
            untrained = ActQuantSettings(bits=self.act_quantizer.bits, mode=self.act_quantizer.mode, learnable=False, clip_init=1.0)
            self.act_quantizer = ActivationQuantizer(untrained).to(self.weight.device)
        if self.correction is not None:  # kept (a resumed run expects its tensors) but contributing nothing
            self.correction.u.zero_()

    # --- finalisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> FinalizedQuantLinear:
        """The finalised layer: hardened rounding and frozen clipping stored as integer codes, nothing trainable.

        This layer is left as it is; :func:`cbq_lightning.quant.convert.finalize_block` puts the returned one in
        its place. The activation quantizer and correction move to the new layer, frozen.
        """
        assert self.quantizer is not None
        quantizer = self.quantizer
        scale, zero, minimum = quantizer.grid(self.weight)
        supers = quantizer.super_scales(self.weight)
        offset = self.signed_offset()
        hard = self.rounding.decisions(hard=True)
        codes = quantizer.codes(self.weight, scale, zero, hard, offset, minimum)
        flip_fraction = None
        if offset is not None or hard is not None:
            nearest = quantizer.codes(self.weight, scale, zero, None, minimum=minimum)
            flip_fraction = float((codes != nearest).float().mean())
        if self.act_quantizer is not None:
            self.act_quantizer.requires_grad_(False)
        if self.correction is not None:
            self.correction.requires_grad_(False)
        return FinalizedQuantLinear(
            codes.reshape(self.out_features, self.in_features).to(torch.uint8),
            scale.squeeze(-1).to(torch.float32),
            zero.squeeze(-1).to(torch.uint8),
            mins=None if minimum is None else minimum.squeeze(-1).to(torch.float32),
            super_scales=None if supers is None else supers[0].to(torch.float32),
            super_mins=None if supers is None or supers[1] is None else supers[1].to(torch.float32),
            ggml_type=quantizer.ggml_name,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            bias=self.bias,
            dtype=self.weight.dtype,
            act_quantizer=self.act_quantizer,
            correction=self.correction,
            flip_fraction=flip_fraction,
        )

    def extra_repr(self) -> str:
        group = self.group_size or "channel"
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={group}, calibrating"
