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

The K-quants (``Q2_K`` ... ``Q6_K``) store super-blocks of 256 weights split into sub-blocks of 16 or 32, each
with its own scale (and minimum) that is itself quantized: a sub-block's scale is ``d * sc`` with ``d`` one float16 per
super-block and ``sc`` a 4-, 6- or 8-bit integer, its minimum ``dmin * m`` likewise. The grid of a sub-block is
therefore not free: CBQ's clipping acts on the float scales, which are then put on that two-level grid in every
forward (:mod:`cbq_lightning.quant.ggml_quantizer`):

* ``Q2_K``: sub-blocks of 16, ``w = d * sc * q - dmin * m``, ``q`` in ``0..3``, ``sc`` and ``m`` 4-bit;
* ``Q3_K``: sub-blocks of 16, ``w = d * (sc - 32) * (q - 4)``, ``q`` in ``0..7``, ``sc`` 6-bit (signed scale);
* ``Q4_K`` / ``Q5_K``: sub-blocks of 32, ``w = d * sc * q - dmin * m``, ``q`` in ``0..15`` / ``0..31``, 6-bit ``sc``, ``m``;
* ``Q6_K``: sub-blocks of 16, ``w = d * sc * (q - 32)``, ``q`` in ``0..63``, ``sc`` an int8.

The names a user gives ``quant.scheme`` are ``llama-quantize``'s: the legacy types stand for themselves (every
quantized linear in that type), and a K name is one of llama.cpp's per-tensor mixes (``Q4_K_M``, ``Q2_K`` ...; ``Q4_K``
is ``llama-quantize``'s alias of ``Q4_K_M``), whose tensor-by-tensor choice :mod:`cbq_lightning.quant.ggml_mix`
follows. The importance-matrix and ternary types are known by name so that they are refused with one clear line
rather than misread.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbq_lightning.errors import ConfigError

#: weights per block of every legacy GGML type (``QK4_0`` ... ``QK8_0`` in ggml)
BLOCK_SIZE = 32
#: weights per super-block of every K-quant (``QK_K``)
SUPER_BLOCK_SIZE = 256
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
            is stored on the one code the other side lacks (for ``Q3_K`` / ``Q6_K``: each sub-block's scale).
        sub_block: weights per stored scale (32 for the legacy types; 16 or 32 for a K-quant).
        super_block: weights per super-block of a K-quant (256), None for the legacy types.
        scale_bits: bits of a K-quant's integer sub-block scale (and minimum); 0 for the legacy types.
    """

    name: str
    bits: int
    minimum: bool
    zero: int
    qmin: int
    qmax: int
    scale_divisor: float
    signed_scale: bool = False
    sub_block: int = BLOCK_SIZE
    super_block: int | None = None
    scale_bits: int = 0

    @property
    def block_size(self) -> int:
        """Weights per stored scale along a row: the scheme's group size (a K-quant's sub-block)."""
        return self.sub_block

    @property
    def row_multiple(self) -> int:
        """What a row's length must be a multiple of for this type (llama.cpp falls back to another type otherwise)."""
        return self.super_block or self.sub_block

    @property
    def is_k_quant(self) -> bool:
        return self.super_block is not None

    @property
    def scale_levels(self) -> int:
        """A K-quant's integer sub-block scales: ``1..levels`` (unsigned, with a minimum) or ``-levels..levels-1``
        (signed: ``Q3_K``, ``Q6_K``)."""
        return 2 ** (self.scale_bits - 1) if self.signed_scale else 2**self.scale_bits - 1

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
        GGMLBlockType("Q2_K", bits=2, minimum=True, zero=0, qmin=0, qmax=3, scale_divisor=3.0, sub_block=16,
                      super_block=SUPER_BLOCK_SIZE, scale_bits=4),
        GGMLBlockType("Q3_K", bits=3, minimum=False, zero=4, qmin=0, qmax=7, scale_divisor=-4.0, signed_scale=True,
                      sub_block=16, super_block=SUPER_BLOCK_SIZE, scale_bits=6),
        GGMLBlockType("Q4_K", bits=4, minimum=True, zero=0, qmin=0, qmax=15, scale_divisor=15.0, sub_block=32,
                      super_block=SUPER_BLOCK_SIZE, scale_bits=6),
        GGMLBlockType("Q5_K", bits=5, minimum=True, zero=0, qmin=0, qmax=31, scale_divisor=31.0, sub_block=32,
                      super_block=SUPER_BLOCK_SIZE, scale_bits=6),
        GGMLBlockType("Q6_K", bits=6, minimum=False, zero=32, qmin=0, qmax=63, scale_divisor=-32.0, signed_scale=True,
                      sub_block=16, super_block=SUPER_BLOCK_SIZE, scale_bits=8),
    )
}
#: the legacy types, which a scheme names directly (a K name as a scheme is one of llama.cpp's mixes)
LEGACY_TYPES: tuple[str, ...] = tuple(name for name, t in GGML_TYPES.items() if not t.is_k_quant)

#: GGML/llama.cpp names known but not implemented: the importance-matrix (``IQ*``), ternary and MXFP4 types, and
#: ``Q8_K`` (llama.cpp's intermediate type for dot products, never stored) - refused by name, never misread
NOT_IMPLEMENTED: frozenset[str] = frozenset({
    "Q8_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4",
})


def is_ggml_name(text: str) -> bool:
    """Whether ``text`` names a GGML type or one of llama.cpp's mixes, implemented or not (case-insensitive)."""
    from cbq_lightning.quant.ggml_mix import canonical_mix

    name = text.strip().upper()
    return name in GGML_TYPES or name in NOT_IMPLEMENTED or canonical_mix(name) is not None


def ggml_type(text: str) -> GGMLBlockType:
    """The GGML block type called ``text`` (case-insensitive), or a one-line :class:`ConfigError`."""
    name = text.strip().upper()
    if name in GGML_TYPES:
        return GGML_TYPES[name]
    implemented = ", ".join(GGML_TYPES)
    if name in NOT_IMPLEMENTED:
        raise ConfigError(
            f"{text!r} is a llama.cpp importance-matrix, ternary or intermediate type, which cbq-lightning does not "
            f"calibrate: use one of the GGML types {implemented}, or a llama.cpp mix such as Q4_K_M."
        )
    raise ConfigError(f"{text!r} is not a GGML type: use one of {implemented}.")


def ggml_type_id(name: str) -> int:
    """The number GGUF files use for the block type ``name`` (``gguf.GGMLQuantizationType``)."""
    import gguf

    return int(gguf.GGMLQuantizationType[ggml_type(name).name])


def ggml_type_name(type_id: int) -> str:
    """The block type of a GGUF type number, or a one-line :class:`ConfigError` if it is not one cbq-lightning stores."""
    import gguf

    try:
        name = gguf.GGMLQuantizationType(int(type_id)).name
    except ValueError:
        raise ConfigError(f"GGML type number {type_id} is not a GGML type.") from None
    return ggml_type(name).name
