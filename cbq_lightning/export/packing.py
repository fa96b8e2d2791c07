"""Exact bit packing of unsigned integer codes into int32 words, shared by every packed export format.

Layout: along the packed dimension, the codes form one dense little-endian bitstream - element ``i``
occupies bits ``[i*b, (i+1)*b)`` of the stream, bit ``k`` of the stream is bit ``k % 32`` of word
``k // 32``, and the stream is zero-padded to a whole number of words. Codes may straddle two words,
which is what lets 3-bit codes use 3 words per 32 values instead of wasting 2 bits a word; for 2, 4 and
8 bits it is the familiar "``32 / b`` codes per word, lowest bits first" layout.

This is the compressed-tensors ``pack-quantized`` layout (codes packed along ``in`` for weights, along
``out`` for zero-points) and the GPTQ v1 one (``qweight`` is the same words transposed: packed along
``in`` of an ``[in, out]`` matrix; ``qzeros`` packed along ``out``), so one implementation serves both.

Words are returned as int32 (the dtype both formats store): bit 31 becomes the sign bit, the bits are
unchanged.
"""

from __future__ import annotations

import math

import torch

#: bits per packed word; 32 codes of b bits fill exactly b words, the unit both loops below work in
WORD_BITS = 32
#: elements processed at once, so that a 7B-sized matrix needs no whole-matrix int64 temporaries
_CHUNK_ELEMENTS = 1 << 22
_WORD_MASK = 0xFFFFFFFF


def packed_length(length: int, bits: int) -> int:
    """Words needed for ``length`` codes of ``bits`` bits: ``ceil(length * bits / 32)``."""
    return math.ceil(length * bits / WORD_BITS)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} cannot be packed: codes of 1..8 bits only.")


def _along_last(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` as a 2-D matrix whose rows run along ``dim`` (the packed dimension)."""
    if tensor.dim() != 2 or dim not in (0, 1, -1, -2):
        raise ValueError(f"packing needs a 2-D tensor and dim 0 or 1, got shape {tuple(tensor.shape)}, dim {dim}.")
    return tensor if dim in (1, -1) else tensor.t()


def _row_chunks(rows: int, row_elements: int) -> range:
    """Start rows of the chunks that keep each temporary near ``_CHUNK_ELEMENTS`` elements."""
    return range(0, rows, max(1, _CHUNK_ELEMENTS // max(row_elements, 1)))


def _overlaps(bits: int) -> list[tuple[int, int, int]]:
    """``(word, element, shift)`` for every (word, code) pair of a 32-code unit that share bits.

    Code ``i`` starts at stream bit ``i * bits``; relative to word ``w`` that is ``shift = i*bits - 32w``,
    and the two overlap when ``-bits < shift < 32`` (a negative shift: the code began in the word before).
    """
    return [
        (word, element, element * bits - WORD_BITS * word)
        for word in range(bits)
        for element in range(WORD_BITS)
        if -bits < element * bits - WORD_BITS * word < WORD_BITS
    ]


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned ``codes`` (2-D, values in ``[0, 2**bits - 1]``) along ``dim`` into int32 words.

    The result has ``packed_length(codes.shape[dim], bits)`` words along ``dim`` and the other
    dimension unchanged. Out-of-range codes raise instead of silently corrupting their neighbours.
    """
    _check_bits(bits)
    matrix = _along_last(codes, dim)
    if matrix.numel() and (int(matrix.min()) < 0 or int(matrix.max()) >= 2**bits):
        raise ValueError(
            f"codes outside [0, {2**bits - 1}] cannot be packed at {bits} bits "
            f"(found {int(matrix.min())}..{int(matrix.max())})."
        )
    rows, length = matrix.shape
    units = math.ceil(length / WORD_BITS)
    words = packed_length(length, bits)
    overlaps = _overlaps(bits)
    chunks = []
    step = _row_chunks(rows, units * WORD_BITS)
    for start in step:
        block = matrix[start : start + step.step].to(torch.int64)
        rows_here = len(block)
        # element-major [32, rows, units]: each code position of the unit is one contiguous slice
        block = torch.nn.functional.pad(block, (0, units * WORD_BITS - length))
        block = block.reshape(rows_here, units, WORD_BITS).permute(2, 0, 1).contiguous()
        unsigned = torch.zeros(bits, rows_here, units, dtype=torch.int64)
        for word, element, shift in overlaps:
            unsigned[word] |= block[element] << shift if shift >= 0 else block[element] >> -shift
        unsigned = unsigned.bitwise_and_(_WORD_MASK).permute(1, 2, 0).reshape(rows_here, units * bits)[:, :words]
        chunks.append(_to_int32(unsigned))
    packed = torch.cat(chunks) if chunks else torch.zeros(0, words, dtype=torch.int32)
    return packed if dim in (1, -1) else packed.t().contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``length`` codes along ``dim``, as int64."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}.")
    matrix = _along_last(packed, dim)
    rows, words = matrix.shape
    if words != packed_length(length, bits):
        raise ValueError(
            f"{words} words per row cannot hold exactly {length} codes of {bits} bits "
            f"(expected {packed_length(length, bits)})."
        )
    units = math.ceil(length / WORD_BITS)
    overlaps = _overlaps(bits)
    chunks = []
    step = _row_chunks(rows, units * WORD_BITS)
    for start in step:
        block = matrix[start : start + step.step].to(torch.int64).bitwise_and_(_WORD_MASK)
        rows_here = len(block)
        block = torch.nn.functional.pad(block, (0, units * bits - words))
        block = block.reshape(rows_here, units, bits).permute(2, 0, 1).contiguous()
        codes = torch.zeros(WORD_BITS, rows_here, units, dtype=torch.int64)
        for word, element, shift in overlaps:
            codes[element] |= block[word] >> shift if shift >= 0 else block[word] << -shift
        codes = codes.bitwise_and_(2**bits - 1).permute(1, 2, 0).reshape(rows_here, units * WORD_BITS)[:, :length]
        chunks.append(codes)
    codes = torch.cat(chunks) if chunks else torch.zeros(0, length, dtype=torch.int64)
    return codes if dim in (1, -1) else codes.t().contiguous()


def _to_int32(unsigned: torch.Tensor) -> torch.Tensor:
    """32-bit unsigned values (in int64) reinterpreted as int32 with the same bits."""
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)
