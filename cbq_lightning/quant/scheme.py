"""Quantization scheme strings (``W4A16``, ``W3A16G64``, ``W4A8`` ...) and their validated form.

A scheme string is the compact name users and papers use; :class:`QuantScheme` is what the code reads.
Parsing and validation live here so that every entry point (CLI, Python API, benchmarks) rejects the
same bad input with the same message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cbq_lightning.errors import ConfigError

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
    """

    w_bits: int = 4
    group_size: int | None = None
    a_bits: int = FP_ACT_BITS
    sym: bool = False

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

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < FP_ACT_BITS

    @property
    def name(self) -> str:
        """Canonical scheme string, e.g. ``W3A16G64``."""
        group = f"G{self.group_size}" if self.group_size else ""
        return f"W{self.w_bits}A{self.a_bits}{group}"


def parse_scheme(text: str) -> QuantScheme:
    """Parse ``W{bits}A{bits}[G{group}]`` (case-insensitive) into a :class:`QuantScheme`.

    >>> parse_scheme("W3A16G64")
    QuantScheme(w_bits=3, group_size=64, a_bits=16, sym=False)
    """
    match = _SCHEME_RE.match(text.strip())
    if match is None:
        raise ConfigError(
            f"scheme {text!r} is not understood: write it as W<bits>A<bits>[G<group>], "
            "e.g. W4A16, W3A16G64, W4A8."
        )
    group = int(match["g"]) if match["g"] else None
    return QuantScheme(w_bits=int(match["w"]), group_size=group, a_bits=int(match["a"]))


def valid_group_sizes(in_features: int, limit: int = 512) -> list[int]:
    """Group sizes that divide ``in_features`` (powers of two first would hide e.g. 576 = 9 x 64)."""
    return [g for g in range(8, min(in_features, limit) + 1) if in_features % g == 0]
