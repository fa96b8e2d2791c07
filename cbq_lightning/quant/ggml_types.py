"""llama.cpp's (GGML's) block quantization types as quantization schemes: ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``.

Why a table of its own: a GGUF stores each block of 32 consecutive weights of a row (along the input dimension)
as a float16 scale ``d``, for the ``_1`` types a float16 minimum ``m`` too, and small integer codes. CBQ can only
promise that the exported file computes what it calibrated if it calibrates on exactly that grid, so every
number that decides the grid lives here, once, read by the quantizer (:mod:`cbq_lightning.quant.ggml_quantizer`)
and by the GGUF writer (:mod:`cbq_lightning.export.gguf`):

* ``Q4_0`` / ``Q5_0``: ``w = d * (q - 8)`` / ``d * (q - 16)`` with ``q`` in ``0..15`` / ``0..31``; llama.cpp's reference
  quantizer sets ``d = x / -8`` (``/ -16``) where ``x`` is the block's weight of largest magnitude, *with its sign*,
  so that weight lands exactly on the lowest code and ``d`` may be negative.
* ``Q4_1`` / ``Q5_1``: ``w = d * q + m`` with ``q`` in ``0..15`` / ``0..31``, ``d = (max - min) / 15`` (``/ 31``),
  ``m = min`` (no zero-point: the minimum is a float16 value, not a code).
* ``Q8_0``: ``w = d * q`` with ``q`` an int8 in ``-127..127`` (llama.cpp never writes -128), ``d = max|w| / 127``.

In cbq-lightning's unsigned-code convention (``quant_state.safetensors``: codes in ``[qmin, qmax]``, dequantized as
``scale * (code - zero)``) the ``_0`` types are symmetric grids with ``zero`` fixed (8, 16, 128; Q8_0's codes are
``q + 128`` in ``1..255``), and the ``_1`` types keep ``zero = 0`` and a per-block ``minimum``.

The K-quants (``Q2_K`` ... ``Q6_K``: super-blocks of 256 whose sub-block scales and minimums are themselves
quantized) and llama.cpp's per-tensor mixes (``Q4_K_M`` ...) are known by name so that they are refused with one
clear line rather than misread; they are not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbq_lightning.errors import ConfigError

#: weights per block of every legacy GGML type (``QK4_0`` ... ``QK8_0`` in ggml)
BLOCK_SIZE = 32
#: the largest finite float16, and the smallest positive one (a subnormal): the range a stored scale can hold
FLOAT16_MAX = 65504.0
FLOAT16_TINY = 2.0**-24


@dataclass(frozen=True)
class GGMLBlockType:
    """One legacy GGML block type.

    Attributes:
        name: llama.cpp's name (``Q4_0``), also ``gguf.GGMLQuantizationType``'s member name.
        bits: bits per code.
        minimum: the block stores a float16 minimum ``m`` and dequantizes as ``d * q + m`` (the ``_1`` types);
            False: ``d * (q - zero)``.
        zero: the code that stands for 0 in the unsigned convention (0 for the ``_1`` types).
        qmin, qmax: the smallest and largest unsigned code the format stores.
        scale_divisor: ``d = extreme / scale_divisor`` at clipping ratio 1, where ``extreme`` is the block's
            largest-magnitude weight with its sign (``signed_scale``) or its magnitude; the ``_1`` types divide
            ``max - min`` by it.
        signed_scale: ``d`` takes the sign of the block's largest-magnitude weight (Q4_0, Q5_0), so that weight
            is stored on the one code the other side lacks.
    """

    name: str
    bits: int
    minimum: bool
    zero: int
    qmin: int
    qmax: int
    scale_divisor: float
    signed_scale: bool = False

    @property
    def block_size(self) -> int:
        """Weights per block along a row: the scheme's group size. (A K-quant will have super-blocks of 256 whose
        sub-block scales are quantized: a type of its own beside this one, read through the same scheme name.)"""
        return BLOCK_SIZE

    @property
    def symmetric(self) -> bool:
        """A fixed zero-point and no minimum (what ``QuantScheme.sym`` records)."""
        return not self.minimum


GGML_TYPES: dict[str, GGMLBlockType] = {
    t.name: t
    for t in (
        GGMLBlockType("Q4_0", bits=4, minimum=False, zero=8, qmin=0, qmax=15, scale_divisor=-8.0, signed_scale=True),
        GGMLBlockType("Q4_1", bits=4, minimum=True, zero=0, qmin=0, qmax=15, scale_divisor=15.0),
        GGMLBlockType("Q5_0", bits=5, minimum=False, zero=16, qmin=0, qmax=31, scale_divisor=-16.0, signed_scale=True),
        GGMLBlockType("Q5_1", bits=5, minimum=True, zero=0, qmin=0, qmax=31, scale_divisor=31.0),
        GGMLBlockType("Q8_0", bits=8, minimum=False, zero=128, qmin=1, qmax=255, scale_divisor=127.0),
    )
}

#: GGML/llama.cpp names known but not implemented: the K-quant block types, ``llama-quantize``'s mixes of them, and
#: the importance-matrix types (refused by name, so a K-quant is never misread as something else)
NOT_IMPLEMENTED: frozenset[str] = frozenset({
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
    "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4",
})


def is_ggml_name(text: str) -> bool:
    """Whether ``text`` names a GGML type or mix, implemented or not (case-insensitive)."""
    name = text.strip().upper()
    return name in GGML_TYPES or name in NOT_IMPLEMENTED


def ggml_type(text: str) -> GGMLBlockType:
    """The implemented GGML block type called ``text`` (case-insensitive), or a one-line :class:`ConfigError`."""
    name = text.strip().upper()
    if name in GGML_TYPES:
        return GGML_TYPES[name]
    implemented = ", ".join(GGML_TYPES)
    if name in NOT_IMPLEMENTED:
        raise ConfigError(
            f"scheme {text!r} is a llama.cpp K-quant, mix or importance-matrix type, which is not implemented yet: "
            f"use one of the legacy GGML types {implemented}."
        )
    raise ConfigError(f"scheme {text!r} is not a GGML type: use one of {implemented}.")
