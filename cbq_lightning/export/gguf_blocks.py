"""Pack a run's integer codes and float16 scales into GGML's legacy block layouts (``Q4_0`` ... ``Q8_0``).

Why our own packing: ``gguf.quants`` only quantizes *from floats*, choosing its own scales and codes; a CBQ run has
already chosen both (the learned clipping and rounding), and re-quantizing its dequantized weights would not give
them back. So the bytes are written here from the codes, following ggml's block structs (``block_q4_0`` ... in
ggml-common.h, as ``gguf.quants`` reads them), and the tests check them against ``gguf.quants.dequantize``:

* ``Q4_0``: ``d`` (fp16), 16 bytes ``qs``: byte ``j`` holds code ``j`` in its low and code ``j + 16`` in its high nibble.
* ``Q4_1``: ``d``, ``m`` (fp16), then ``qs`` as ``Q4_0``.
* ``Q5_0``: ``d``, ``qh`` (uint32, little-endian: bit ``j`` is bit 4 of code ``j``), ``qs`` of the low 4 bits as ``Q4_0``.
* ``Q5_1``: ``d``, ``m``, ``qh``, ``qs``.
* ``Q8_0``: ``d``, 32 int8 codes ``q - 128``.

Codes arrive in cbq-lightning's unsigned convention (``quant_state.safetensors``), which for these types is the
format's own ``q`` (``Q4_0``: ``w = d * (q - 8)``) except ``Q8_0``'s, which is stored signed.
"""

from __future__ import annotations

import numpy as np
import torch

from cbq_lightning.quant.ggml_types import BLOCK_SIZE, GGMLBlockType

_HALF = BLOCK_SIZE // 2


def _float16_bytes(values: torch.Tensor, what: str, layer: str) -> np.ndarray:
    """``values`` (``[blocks]`` float32 that must be float16 numbers) as 2 bytes each; refuses any that are not."""
    array = values.detach().cpu().numpy().astype(np.float32).reshape(-1)
    half = array.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), array):
        bad = int(np.flatnonzero(half.astype(np.float32) != array)[0])
        raise ValueError(
            f"{layer}: {what} {array[bad]!r} of block {bad} is not a float16 number: the run was not calibrated on "
            "the GGML grid (quant.scheme must be the GGML type), so its codes cannot be stored exactly."
        )
    return half.view(np.uint8).reshape(-1, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``[blocks, 32]`` 4-bit values -> ``[blocks, 16]`` bytes (code ``j`` low, ``j + 16`` high)."""
    return (codes[:, :_HALF] & 0x0F) | ((codes[:, _HALF:] & 0x0F) << 4)


def _high_bits(codes: np.ndarray) -> np.ndarray:
    """``[blocks, 32]`` 5-bit values -> ``[blocks, 4]`` bytes: their fifth bits as one little-endian uint32."""
    bits = ((codes >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(BLOCK_SIZE, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return word.astype("<u4").view(np.uint8).reshape(-1, 4)


def pack_blocks(
    block_type: GGMLBlockType, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, layer: str = "layer"
) -> np.ndarray:
    """The ``[out, in / 32 * type_size]`` uint8 rows of one weight in ``block_type``'s layout.

    Args:
        block_type: the GGML type.
        codes: ``[out, in]`` unsigned codes in ``[qmin, qmax]``.
        scales: ``[out, in / 32]`` float16 values (as float32).
        mins: ``[out, in / 32]`` float16 minimums for the ``_1`` types, else None.
        layer: the layer's name, for errors.
    """
    out_features, in_features = codes.shape
    if in_features % BLOCK_SIZE:
        raise ValueError(f"{layer}: {in_features} inputs are not a multiple of {block_type.name}'s {BLOCK_SIZE}.")
    q = codes.detach().cpu().numpy().astype(np.int16).reshape(-1, BLOCK_SIZE)
    if q.min() < block_type.qmin or q.max() > block_type.qmax:
        raise ValueError(f"{layer}: codes outside {block_type.name}'s {block_type.qmin}..{block_type.qmax}.")
    parts = [_float16_bytes(scales, "scale", layer)]
    if block_type.minimum:
        if mins is None:
            raise ValueError(f"{layer}: {block_type.name} stores a minimum per block, and the run has none.")
        parts.append(_float16_bytes(mins, "minimum", layer))
    if block_type.bits == 8:
        parts.append((q - block_type.zero).astype(np.int8).view(np.uint8))
    else:
        unsigned = q.astype(np.uint8)
        if block_type.bits == 5:
            parts.append(_high_bits(unsigned))
        parts.append(_nibbles(unsigned))
    blocks = np.concatenate(parts, axis=1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))
