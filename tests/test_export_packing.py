"""Bit packing of integer codes (shared by compressed-tensors and GPTQ export): exact, and laid out as the
formats define it (bit patterns worked out by hand from the dense LSB-first bitstream rule)."""

from __future__ import annotations

import math

import pytest
import torch

from cbq_lightning.export.packing import pack_codes, packed_length, unpack_codes

SHAPES = [(16, 64), (7, 33), (33, 7), (1, 1), (5, 96), (3, 31)]


def _words(packed: torch.Tensor) -> list[int]:
    """int32 words as unsigned 32-bit integers."""
    return [int(word) & 0xFFFFFFFF for word in packed.flatten()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
def test_unpack_of_pack_is_exact(bits: int, shape: tuple[int, int], dim: int) -> None:
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits * 100 + dim))
    packed = pack_codes(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    expected = list(shape)
    expected[dim] = math.ceil(shape[dim] * bits / 32)
    assert list(packed.shape) == expected
    assert torch.equal(unpack_codes(packed, bits, shape[dim], dim=dim), codes)


def test_extreme_codes_survive_the_sign_bit() -> None:
    """All-ones codes fill bit 31 (negative int32): unpacking must not sign-extend into them."""
    for bits in (2, 3, 4, 8):
        codes = torch.full((4, 64), 2**bits - 1)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 64), codes)


def test_bit_patterns() -> None:
    # 4 bits: element i in bits [4i, 4i+4) of word 0, lowest first
    assert _words(pack_codes(torch.tensor([[0, 1, 9, 15, 8, 8, 8, 8]]), 4)) == [0x8888F910]
    # 2 bits: 16 per word
    assert _words(pack_codes(torch.tensor([[0, 1, 2, 3] + [2] * 12]), 2)) == [0xAAAAAAE4]
    # 8 bits: 4 per word
    assert _words(pack_codes(torch.tensor([[0, 127, 128, 255]]), 8)) == [0xFF807F00]
    # 3 bits: 11 x 0b111 = 33 one-bits, element 10 straddles words 0 and 1
    assert _words(pack_codes(torch.full((1, 11), 7), 3)) == [0xFFFFFFFF, 0x1]
    # 3 bits: 32 codes fill exactly 3 words (no wasted bits)
    assert packed_length(32, 3) == 3 and packed_length(256, 3) == 24 and packed_length(33, 3) == 4


def test_packing_along_dim_0_packs_columns() -> None:
    codes = torch.randint(0, 16, (24, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_codes(codes, 4, dim=0), pack_codes(codes.t(), 4, dim=1).t())


def test_out_of_range_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError, match="words"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.int32), 4, 8)
