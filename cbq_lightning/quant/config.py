"""User-facing quantization settings: the scheme string (bits, group size, activation bits) and how to quantize."""

from __future__ import annotations

from dataclasses import dataclass

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.act_quantizer import ActMode, ActQuantSettings
from cbq_lightning.quant.scheme import QuantScheme, parse_scheme


@dataclass
class QuantConfig:
    """What to quantize and how.

    Attributes:
        scheme: ``W<bits>A<bits>[G<group>]``, e.g. ``W4A16`` (per-channel), ``W3A16G64``, ``W4A8``: the one
            place that says the weight bits, the group size and the activation bits (16 = floating point); or a
            GGML block type ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0`` (calibrated on llama.cpp's exact grid,
            for ``export.format: gguf``; it fixes the bits, blocks of 32 and the symmetry).
        sym: symmetric weights (needed for GPTQ-v1 export); a GGML type sets it itself.
        learnable_clip: learn per-channel/group clipping thresholds (CBQ); False keeps min/max.
        act_mode: activation quantizer when a_bits < 16: ``dynamic_sym`` (per token, symmetric: what
            vLLM serves), ``dynamic_asym`` (per token, asymmetric) or ``static_lsq`` (one learned step
            per layer).

    Where the clipping starts, and whether the activation clipping trains, are :class:`QuantTuning`
    (``advanced.quant``).
    """

    scheme: str = "W4A16"
    sym: bool = False
    learnable_clip: bool = True
    act_mode: ActMode = "dynamic_sym"

    def resolve(self) -> QuantScheme:
        """The scheme string with ``sym``, validated."""
        base = parse_scheme(self.scheme)
        if base.gguf_type is not None:
            return self._resolve_ggml(base)
        scheme = QuantScheme(w_bits=base.w_bits, group_size=base.group_size, a_bits=base.a_bits, sym=self.sym)
        if scheme.quantizes_activations:
            self.act_settings(trained=False, tuning=QuantTuning())  # raises a ConfigError on a bad mode
        return scheme

    def _resolve_ggml(self, scheme: QuantScheme) -> QuantScheme:
        """A GGML type decides the symmetry and the bits itself; settings that would contradict it are refused."""
        block = scheme.ggml
        assert block is not None
        if self.sym and block.minimum:
            raise ConfigError(
                f"quant.sym: true with {block.name}, which stores a minimum per block: use "
                f"{block.name.replace('_1', '_0')} for a symmetric GGML type, or drop quant.sym."
            )
        return scheme

    def act_settings(self, trained: bool, tuning: QuantTuning) -> ActQuantSettings | None:
        """The activation quantization of the run, or None for weight-only schemes (raises a ConfigError on a bad
        mode or starting clipping ratio).

        ``trained=False`` (the RTN baseline) gives the untrained quantizer: no clipping, nothing learned.
        """
        bits = parse_scheme(self.scheme).a_bits
        if bits >= 16:
            return None
        if not trained:
            return ActQuantSettings(bits=bits, mode=self.act_mode, learnable=False, clip_init=1.0)
        return ActQuantSettings(
            bits=bits, mode=self.act_mode, learnable=tuning.act_learnable, clip_init=tuning.act_clip_init
        )


@dataclass
class QuantTuning:
    """Where the clipping starts and whether the activation clipping trains (``advanced.quant``): defaults that
    suit every run measured so far, out of the core a user reads.

    Attributes:
        clip_init: initial clipping ratio of the learnable weight thresholds (sigmoid of the logit), in (0, 1).
        act_learnable: train the activation clipping logit(s) / static step with the window (CBQ does; false is
            an ablation, and RTN keeps them at their start whatever this says).
        act_clip_init: starting clipping ratio of the dynamic activation quantizers (RTN uses 1.0).
    """

    clip_init: float = 0.99
    act_learnable: bool = True
    act_clip_init: float = 0.99
