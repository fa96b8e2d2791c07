"""Quantization scheme strings (``W4A16``, ``W3A16G64``, ``W4A8`` ..., or a GGML type ``Q4_0`` ...) and their
validated form.

A scheme string is the compact name users and papers use; :class:`QuantScheme` is what the code reads.
Parsing and validation live here so that every entry point (CLI, Python API, benchmarks) rejects the
same bad input with the same message. A GGML type name (:mod:`cbq_lightning.quant.ggml_types`) fixes the bits,
blocks of 32 and the symmetry, and makes the quantizer calibrate on that format's exact grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.ggml_types import LEGACY_TYPES, GGMLBlockType, ggml_type, is_ggml_name

_SCHEME_RE = re.compile(r"^W(?P<w>\d+)A(?P<a>\d+)(?:G(?P<g>\d+))?$", re.IGNORECASE)

MIN_BITS, MAX_BITS = 2, 8
#: activation bit-widths at or above this mean "activations stay in floating point"
FP_ACT_BITS = 16


@dataclass(frozen=True)
class QuantScheme:
    """Resolved quantization settings for the weights (and activations) of every block linear.

    Attributes:
        w_bits: weight bit-width, 2..8.
        group_size: number of input features sharing one scale/zero-point; ``None`` means one per
            output channel (per-channel quantization).
        a_bits: activation bit-width; 16 means activations are not quantized.
        sym: symmetric weights (zero-point fixed at ``2**(b-1)``), needed for GPTQ-v1 export.
        gguf_type: a GGML block type (``Q4_0`` ... ``Q6_K``): the weights are calibrated on that format's grid
            (float16 scales, its code range, a float16 minimum for the ``_1`` types, a K-quant's integer sub-block
            scales) so a GGUF export stores them exactly; it fixes ``w_bits``, ``group_size`` (32, or a K-quant's
            sub-block) and ``sym``. None: cbq-lightning's own grid.
        gguf_mix: one of llama.cpp's per-tensor mixes (``Q4_K_M`` ...; :mod:`cbq_lightning.quant.ggml_mix`): each
            layer then gets the type llama.cpp would store for it (:meth:`with_ggml_type`), ``gguf_type`` being the
            mix's base type. None: one type for every layer.
    """

    w_bits: int = 4
    group_size: int | None = None
    a_bits: int = FP_ACT_BITS
    sym: bool = False
    gguf_type: str | None = None
    gguf_mix: str | None = None

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.w_bits <= MAX_BITS:
            raise ConfigError(
                f"w_bits={self.w_bits} is out of range: weights can be quantized to {MIN_BITS}..{MAX_BITS} bits."
            )
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(
                f"group_size={self.group_size} is invalid: use a positive divisor of the layers' "
                "in_features, or null/-1 for per-channel quantization."
            )
        if self.a_bits < FP_ACT_BITS and not MIN_BITS <= self.a_bits <= MAX_BITS:
            raise ConfigError(
                f"a_bits={self.a_bits} is out of range: use {MIN_BITS}..{MAX_BITS}, or {FP_ACT_BITS} "
                "to keep activations in floating point."
            )
        if self.gguf_type is not None:
            self._check_ggml(ggml_type(self.gguf_type))
        elif self.gguf_mix is not None:
            raise ValueError("a llama.cpp mix needs its base GGML type")

    def _check_ggml(self, block: GGMLBlockType) -> None:
        """A GGML type fixes the bits, the block size and the symmetry; nothing may override them."""
        if self.w_bits != block.bits:
            raise ConfigError(
                f"{block.name} stores {block.bits}-bit codes, not {self.w_bits}: per-layer bits (extensions.layer_bits, "
                "extensions.mixed.budget) are not available with a GGML type."
            )
        if self.group_size != block.block_size:
            raise ConfigError(f"{block.name} has blocks of {block.block_size} weights, not {self.group_size}.")
        if self.sym != block.symmetric:
            raise ConfigError(
                f"{block.name} {'stores a minimum per block' if block.minimum else 'is symmetric'}: quant.sym "
                f"does not apply to it (use {block.name.replace('_1', '_0') if block.minimum else block.name} "
                "for a symmetric grid)."
            )
        if self.quantizes_activations:
            raise ConfigError(f"{block.name} is a weight-only format: activations stay in floating point.")

    def with_ggml_type(self, name: str) -> QuantScheme:
        """The same scheme on the GGML block type ``name`` (a layer of a llama.cpp mix)."""
        block = ggml_type(name)
        return replace(self, w_bits=block.bits, group_size=block.block_size, sym=block.symmetric, gguf_type=block.name)

    @property
    def ggml(self) -> GGMLBlockType | None:
        """The GGML block type of the scheme, or None for cbq-lightning's own grid."""
        return None if self.gguf_type is None else ggml_type(self.gguf_type)

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < FP_ACT_BITS

    @property
    def name(self) -> str:
        """Canonical scheme string, e.g. ``W3A16G64`` (a GGML type's own name, ``Q4_0``, or a mix's, ``Q4_K_M``)."""
        if self.gguf_mix is not None:
            return self.gguf_mix
        if self.gguf_type is not None:
            return self.gguf_type
        group = f"G{self.group_size}" if self.group_size else ""
        return f"W{self.w_bits}A{self.a_bits}{group}"


def parse_scheme(text: str) -> QuantScheme:
    """Parse ``W{bits}A{bits}[G{group}]`` or a GGML type name (case-insensitive) into a :class:`QuantScheme`.

    >>> parse_scheme("W3A16G64")
    QuantScheme(w_bits=3, group_size=64, a_bits=16, sym=False, gguf_type=None)
    >>> parse_scheme("q4_1").name
    'Q4_1'
    >>> parse_scheme("Q4_K").name  # llama-quantize's alias
    'Q4_K_M'
    """
    if is_ggml_name(text):
        from cbq_lightning.quant.ggml_mix import canonical_mix, default_type

        name = text.strip().upper()
        mix = None if name in LEGACY_TYPES else canonical_mix(name)
        block = ggml_type(default_type(mix) if mix is not None else name)  # an IQ type: one line refusing it
        return QuantScheme(w_bits=block.bits, group_size=block.block_size, sym=block.symmetric, gguf_type=block.name,
                           gguf_mix=mix)
    match = _SCHEME_RE.match(text.strip())
    if match is None:
        raise ConfigError(
            f"scheme {text!r} is not understood: write it as W<bits>A<bits>[G<group>], "
            "e.g. W4A16, W3A16G64, W4A8, a GGML type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or a llama.cpp mix (Q2_K, Q3_K_M, "
            "Q4_K_M, Q5_K_M, Q6_K ...)."
        )
    group = int(match["g"]) if match["g"] else None
    return QuantScheme(w_bits=int(match["w"]), group_size=group, a_bits=int(match["a"]))


def valid_group_sizes(in_features: int, limit: int = 512) -> list[int]:
    """Group sizes that divide ``in_features`` (powers of two first would hide e.g. 576 = 9 x 64)."""
    return [g for g in range(8, min(in_features, limit) + 1) if in_features % g == 0]
