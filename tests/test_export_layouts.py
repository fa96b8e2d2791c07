"""Per-layer tensors of the two packed formats: shapes, dtypes and the words the formats' conventions give
(GPTQ v1 zero-points stored minus one, GPTQ qweight = compressed-tensors weight_packed transposed)."""

from __future__ import annotations

import pytest
import torch

from cbq_lightning.export import compressed_tensors, gptq
from cbq_lightning.export.packing import packed_length, unpack_codes
from cbq_lightning.export.quantized_run import QuantizedLayer


def _words(packed: torch.Tensor) -> list[int]:
    """int32 words as unsigned 32-bit integers."""
    return [int(word) & 0xFFFFFFFF for word in packed.flatten()]


def _layer(bits: int, group: int, out_features: int = 64, in_features: int = 64, sym: bool = True) -> QuantizedLayer:
    generator = torch.Generator().manual_seed(bits)
    groups = in_features // group
    if sym:
        zeros = torch.full((out_features, groups), 2 ** (bits - 1))
    else:
        zeros = torch.randint(0, 2**bits, (out_features, groups), generator=generator)
    return QuantizedLayer(
        name="layer",
        codes=torch.randint(0, 2**bits, (out_features, in_features), generator=generator).to(torch.uint8),
        scales=torch.rand(out_features, groups, generator=generator) + 0.01,
        zeros=zeros.to(torch.uint8),
        bits=bits,
        group_size=group,
        act_clip=None,
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_qweight_is_the_compressed_tensors_packing_transposed(bits: int) -> None:
    layer = _layer(bits, group=32)
    ct = compressed_tensors.pack_layer(layer, torch.float32, sym=True)
    packed = gptq.pack_layer(layer)
    assert torch.equal(packed["qweight"], ct["weight_packed"].t())
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (2, 64)
    assert torch.equal(packed["g_idx"], torch.arange(64, dtype=torch.int32) // 32)


@pytest.mark.parametrize(
    ("bits", "words"),
    [(4, [0x77777777]), (8, [0x7F7F7F7F]), (2, [0x55555555]), (3, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D])],
)
def test_gptq_v1_symmetric_zero_points_are_stored_minus_one(bits: int, words: list[int]) -> None:
    """Symmetric zero 2^(b-1) is stored as 2^(b-1) - 1 in every field (the v1 convention)."""
    qzeros = gptq.pack_layer(_layer(bits, group=32))["qzeros"]
    assert qzeros.shape == (2, packed_length(64, bits))
    assert set(_words(qzeros)) == set(words)
    assert _words(qzeros[0, : len(words)]) == words


def test_compressed_tensors_asymmetric_zero_points_are_packed_along_out() -> None:
    layer = _layer(4, group=32, sym=False)
    zero_point = compressed_tensors.pack_layer(layer, torch.float16, sym=False)["weight_zero_point"]
    assert zero_point.shape == (packed_length(64, 4), 2)
    assert torch.equal(unpack_codes(zero_point, 4, 64, dim=0), layer.zeros.to(torch.int64))
