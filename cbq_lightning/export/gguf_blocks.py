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


# --- K-quants (super-blocks of 256: ``block_q2_K`` ... ``block_q6_K`` in ggml-common.h) ----------------------------


def _integer_multiples(values: np.ndarray, unit: np.ndarray, low: int, high: int, what: str, layer: str) -> np.ndarray:
    """``values / unit`` (``[super, sub]`` over ``[super, 1]``) as integers in ``low..high``; refuses values that are
    not exact multiples (a run not calibrated on the K-quant's two-level grid)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = values / unit
    integers = np.rint(ratio)
    bad = ~np.isfinite(ratio) | (integers != ratio) | (integers < low) | (integers > high)
    if bad.any():
        index = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(
            f"{layer}: {what} {values.reshape(-1)[index]!r} is not an integer multiple in {low}..{high} of its "
            "super-block's float16 unit: the run was not calibrated on this K-quant's grid, so it cannot be stored."
        )
    return integers.astype(np.int16)


def _two_bit_planes(codes: np.ndarray) -> np.ndarray:
    """``[n, 256]`` 2-bit values -> ``[n, 64]`` bytes in Q2_K/Q3_K order: each half of 128 weights is four runs of
    32; byte ``32 * half + l`` holds run ``j``'s weight ``l`` at bits ``2j``."""
    runs = codes.reshape(-1, 2, 4, 32).astype(np.uint8)
    packed = runs[:, :, 0] | (runs[:, :, 1] << 2) | (runs[:, :, 2] << 4) | (runs[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit values -> the 12 bytes of ``block_q3_K.scales``: low nibbles of 0..7 and 8..15 in bytes 0..7,
    the high 2 bits of all sixteen in bytes 8..11."""
    s = scales.astype(np.uint8)
    low = (s[:, 0:8] & 0x0F) | ((s[:, 8:16] & 0x0F) << 4)
    high = s >> 4
    top = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    return np.concatenate([low, top], axis=1)


def _k4_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minimums -> the 12 bytes ``get_scale_min_k4`` reads (Q4_K, Q5_K)."""
    sc = scales.astype(np.uint8)
    m = mins.astype(np.uint8)
    first = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    second = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    third = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1)


def _k_nibbles(codes: np.ndarray) -> np.ndarray:
    """``[n, 256]`` values -> ``[n, 128]`` bytes of their low 4 bits in Q4_K/Q5_K order: each run of 64 weights is
    32 bytes, weights ``0..31`` in the low and ``32..63`` in the high nibbles."""
    runs = codes.reshape(-1, 4, 2, 32).astype(np.uint8) & 0x0F
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(-1, 128)


def _q5_k_high_bits(codes: np.ndarray) -> np.ndarray:
    """``[n, 256]`` 5-bit values -> ``[n, 32]`` bytes: weight ``l`` of sub-block ``k`` at bit ``k`` of byte ``l``."""
    bits = ((codes.reshape(-1, 8, 32) >> 4) & 1).astype(np.uint8)
    return (bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)


def _q6_k_planes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[n, 256]`` 6-bit values -> ``ql`` ``[n, 128]`` and ``qh`` ``[n, 64]``: in each half of 128, quarter ``k`` of 32
    weights has its low 4 bits in byte ``l + 32 * (k % 2)`` (low nibble for ``k < 2``) and its high 2 bits at bits
    ``2k`` of ``qh[l]``."""
    q = codes.reshape(-1, 2, 4, 32).astype(np.uint8)
    low = q & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _k_block_parts(
    block_type: GGMLBlockType, q: np.ndarray, sc: np.ndarray, d_bytes: np.ndarray,
    minimums: tuple[torch.Tensor | None, torch.Tensor | None, int, int], layer: str,
) -> list[np.ndarray]:
    """The byte planes of each super-block in the order ``block_q<k>_K`` lays them out (ggml-common.h).

    ``minimums``: the sub-block minimums, the super-block ``dmin``, sub-blocks per super-block and scale levels
    (the minimums are used by Q2_K, Q4_K and Q5_K only).
    """
    mins, super_mins, per_super, levels = minimums
    name = block_type.name
    if block_type.minimum:
        assert mins is not None and super_mins is not None
        dmin_bytes = _float16_bytes(super_mins, "super-block minimum", layer)
        dmin = dmin_bytes.view(np.float16).astype(np.float32).reshape(-1, 1)
        m = _integer_multiples(-mins.detach().cpu().numpy().astype(np.float32).reshape(-1, per_super), dmin, 0, levels,
                               "sub-block minimum", layer)
        if name == "Q2_K":
            packed_scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4))
            parts = [packed_scales, _two_bit_planes(q), d_bytes, dmin_bytes]
        else:
            parts = [d_bytes, dmin_bytes, _k4_scales(sc, m)]
            if name == "Q5_K":
                parts.append(_q5_k_high_bits(q))
            parts.append(_k_nibbles(q))
    elif name == "Q3_K":
        hmask = ((q.reshape(-1, 8, 32) >> 2) & 1).astype(np.uint8)
        hmask = (hmask << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
        parts = [hmask, _two_bit_planes(q & 3), _q3_k_scales(sc + 32), d_bytes]
    else:  # Q6_K
        ql, qh = _q6_k_planes(q)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d_bytes]
    return parts


def pack_super_blocks(
    block_type: GGMLBlockType,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    super_scales: torch.Tensor | None,
    super_mins: torch.Tensor | None,
    layer: str = "layer",
) -> np.ndarray:
    """The ``[out, in / 256 * type_size]`` uint8 rows of one weight in a K-quant's layout.

    Args:
        block_type: the K-quant.
        codes: ``[out, in]`` unsigned codes in ``[qmin, qmax]``.
        scales: ``[out, in / sub]`` sub-block scales: integer multiples of ``super_scales``.
        mins: ``[out, in / sub]`` sub-block minimums (``-dmin * m``) for Q2_K/Q4_K/Q5_K, else None.
        super_scales, super_mins: ``[out, in / 256]`` float16 ``d`` / ``dmin``.
        layer: the layer's name, for errors.
    """
    assert block_type.super_block is not None
    out_features, in_features = codes.shape
    if in_features % block_type.super_block:
        raise ValueError(f"{layer}: {in_features} inputs are not a multiple of {block_type.name}'s 256.")
    if super_scales is None or (block_type.minimum and (mins is None or super_mins is None)):
        raise ValueError(f"{layer}: {block_type.name} needs the run's super-block scales (and minimums); the "
                         "quantization state has none: rerun cbq quantize with this scheme.")
    q = codes.detach().cpu().numpy().astype(np.int16).reshape(-1, block_type.super_block)
    if q.min() < block_type.qmin or q.max() > block_type.qmax:
        raise ValueError(f"{layer}: codes outside {block_type.name}'s {block_type.qmin}..{block_type.qmax}.")
    per_super = block_type.super_block // block_type.sub_block
    d_bytes = _float16_bytes(super_scales, "super-block scale", layer)
    d = d_bytes.view(np.float16).astype(np.float32).reshape(-1, 1)
    sub_scales = scales.detach().cpu().numpy().astype(np.float32).reshape(-1, per_super)
    levels = block_type.scale_levels
    if block_type.signed_scale:
        sc = _integer_multiples(sub_scales, d, -levels, levels - 1, "sub-block scale", layer)
    else:
        sc = _integer_multiples(sub_scales, d, 0, levels, "sub-block scale", layer)
    parts = _k_block_parts(block_type, q, sc, d_bytes, (mins, super_mins, per_super, levels), layer)
    blocks = np.concatenate(parts, axis=1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))


def pack_layer(
    block_type: GGMLBlockType,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    super_scales: torch.Tensor | None = None,
    super_mins: torch.Tensor | None = None,
    layer: str = "layer",
) -> np.ndarray:
    """One weight's GGML rows in ``block_type``'s layout, legacy or K-quant (the arguments as the run stores them)."""
    if block_type.is_k_quant:
        return pack_super_blocks(block_type, codes, scales, mins, super_scales, super_mins, layer)
    return pack_blocks(block_type, codes, scales, mins, layer)
