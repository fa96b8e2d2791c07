"""User-facing quantization settings: the scheme string (bits, group size, activation bits) and how to quantize."""

from __future__ import annotations

from dataclasses import dataclass, field

from cbq_lightning.quant.act_quantizer import ActMode, ActQuantSettings
from cbq_lightning.quant.continuous import ClampMode, ContinuousApprox, Estimator
from cbq_lightning.quant.gptq import GPTQInit
from cbq_lightning.quant.scheme import QuantScheme, parse_scheme
from cbq_lightning.quant.weight_quantizer import ClipSearch


@dataclass
class QuantConfig:
    """What to quantize and how.

    Attributes:
        scheme: ``W<bits>A<bits>[G<group>]``, e.g. ``W4A16`` (per-channel), ``W3A16G64``, ``W4A8``: the one
            place that says the weight bits, the group size and the activation bits (16 = floating point).
        sym: symmetric weights (needed for GPTQ-v1 export).
        learnable_clip: learn per-channel/group clipping thresholds (CBQ); False keeps min/max.
        clip_init: initial clipping ratio of the learnable thresholds (sigmoid of the logit).
        clip_search: start each group's learnable thresholds at the ratio in
            [clip_search_min, clip_init] that minimises its weight quantization error (grid of
            clip_search_steps ratios, error norm clip_search_norm); off = every group at clip_init.
        clip_search_activation_aware: weight each weight's error by ``E[x^2]`` of the input feature it
            multiplies (measured on the calibration data), i.e. search for the least *output* error.
        gptq_init: start each layer's rounding from GPTQ's codes on its (searched) grid, computed from the
            layer's input Hessian on the window's quantized-path inputs (an extension; see
            :mod:`cbq_lightning.quant.gptq`). The window's fit then refines clipping (and, with
            ``rounding.form: offset``, the rounding) from there. Works with ``method: rtn`` too, which then
            is plain GPTQ.
        gptq_damp: GPTQ's Hessian dampening, a fraction of the diagonal's mean.
        gptq_act_order: GPTQ rounds the columns in order of decreasing Hessian diagonal.
        gptq_true_sequential: measure each linear's Hessian behind the block's already-quantized linears
            (o_proj after q/k/v, the MLP after the attention, down_proj after gate/up), as GPTQ's
            ``true_sequential``; off: every Hessian from the full-precision block on the same inputs.
        act_mode: activation quantizer when a_bits < 16: ``dynamic_sym`` (per token, symmetric: what
            vLLM serves), ``dynamic_asym`` (per token, asymmetric) or ``static_lsq`` (one learned step
            per layer).
        act_learnable: train the activation clipping logit(s) / static step with the window (CBQ only;
            RTN keeps them at their start).
        act_clip_init: starting clipping ratio of the dynamic activation quantizers (RTN uses 1.0).
        estimator: how the window's fit differentiates rounding that is not learned (activation quantizers;
            weights unless soft LoRA-Rounding decides them): ``ste`` (straight-through) or ``sigmoid``
            (the temperature-``T`` sigmoid rounding in the training forward; see
            :mod:`cbq_lightning.quant.continuous`). Training only: measurements and the result are exact.
        clamp: ``hard`` or ``smooth`` (softplus clamp with temperature ``T`` in the training forward, so
            the clipping bounds get gradient from values near and beyond them).
        temperature_start: ``T`` at each window's first step (annealed geometrically).
        temperature_end: ``T`` at its last step.
        layer_bits: per-layer weight bits overriding the scheme's, by layer name ``blocks.<index>.<name in the
            block>`` (e.g. ``blocks.3.mlp.down_proj: 4``); layers that read one input (q/k/v, gate/up) must
            share one value. ``mixed.budget`` writes these itself from a sensitivity pass.
    """

    scheme: str = "W4A16"
    sym: bool = False
    learnable_clip: bool = True
    clip_init: float = 0.99
    clip_search: bool = False
    clip_search_min: float = 0.5
    clip_search_steps: int = 25
    clip_search_norm: float = 2.4
    clip_search_activation_aware: bool = True
    gptq_init: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_true_sequential: bool = False
    act_mode: ActMode = "dynamic_sym"
    act_learnable: bool = True
    act_clip_init: float = 0.99
    estimator: Estimator = "ste"
    clamp: ClampMode = "hard"
    temperature_start: float = 4.0
    temperature_end: float = 64.0
    layer_bits: dict[str, int] = field(default_factory=dict)

    def continuous_settings(self) -> ContinuousApprox | None:
        """The continuous approximations of the fit, or None when both are off; raises a ConfigError on bad values."""
        settings = ContinuousApprox(self.estimator, self.clamp, self.temperature_start, self.temperature_end)
        return settings if settings.active else None

    def clip_search_settings(self) -> ClipSearch | None:
        """The clip search to run, or None (also None when clipping is not learnable: nothing to set)."""
        if not (self.clip_search and self.learnable_clip):
            return None
        return ClipSearch(self.clip_search_min, self.clip_search_steps, self.clip_search_norm)

    def gptq_settings(self) -> GPTQInit | None:
        """The GPTQ initialisation to run, or None; raises a ConfigError on a bad dampening."""
        if not self.gptq_init:
            return None
        return GPTQInit(damp=self.gptq_damp, act_order=self.gptq_act_order)

    def resolve(self) -> QuantScheme:
        """The scheme string with ``sym``, validated."""
        base = parse_scheme(self.scheme)
        scheme = QuantScheme(w_bits=base.w_bits, group_size=base.group_size, a_bits=base.a_bits, sym=self.sym)
        if scheme.quantizes_activations:
            self.act_settings(trained=True)  # raises a ConfigError on a bad mode or clip ratio
        return scheme

    def act_settings(self, trained: bool) -> ActQuantSettings | None:
        """The activation quantization of the run, or None for weight-only schemes.

        ``trained=False`` (the RTN baseline) gives the untrained quantizer: no clipping, nothing learned.
        """
        bits = parse_scheme(self.scheme).a_bits
        if bits >= 16:
            return None
        if not trained:
            return ActQuantSettings(bits=bits, mode=self.act_mode, learnable=False, clip_init=1.0)
        return ActQuantSettings(bits=bits, mode=self.act_mode, learnable=self.act_learnable, clip_init=self.act_clip_init)
