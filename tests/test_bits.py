"""Sign bits: 1 bit per element, round trip for every length, including non-multiples of 8."""

import pytest
import torch

from dist_memopt.optim.bits import pack_signs, packed_numel, unpack_signs


@pytest.mark.parametrize("numel", [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 1000, 4099])
def test_round_trip(numel):
    g = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=g)
    values[::5] = 0.0  # zero counts as non-negative (S = M >= 0)
    packed = torch.empty(packed_numel(numel), dtype=torch.uint8)
    pack_signs(values >= 0, packed)
    assert packed.numel() == (numel + 7) // 8
    signs = unpack_signs(packed, numel)
    assert signs.dtype == torch.float32 and signs.shape == (numel,)
    expected = torch.where(values >= 0, 1.0, -1.0)
    assert torch.equal(signs, expected)


def test_layout_is_lsb_first_and_padding_bits_are_zero():
    packed = torch.empty(2, dtype=torch.uint8)
    pack_signs(torch.tensor([True, False, False, True, True, True, True, True, True, False, True]), packed)
    assert packed.tolist() == [0b11111001, 0b101]


def test_wrong_buffer_size_is_an_error():
    with pytest.raises(ValueError, match="bytes"):
        pack_signs(torch.ones(9, dtype=torch.bool), torch.empty(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes"):
        unpack_signs(torch.empty(1, dtype=torch.uint8), 9)


def test_every_byte_value_round_trips():
    """The multiply-shift packing, checked exhaustively over all 256 sign patterns."""
    patterns = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()
    packed = torch.empty(256, dtype=torch.uint8)
    pack_signs(patterns.reshape(-1), packed)
    assert packed.tolist() == list(range(256))
    assert torch.equal(unpack_signs(packed, 256 * 8) > 0, patterns.reshape(-1))


def test_unaligned_views_pack_like_aligned_ones():
    values = torch.randn(1003) >= 0
    aligned = torch.empty(125, dtype=torch.uint8)
    pack_signs(values[3:].clone(), aligned)
    unaligned = torch.empty(125, dtype=torch.uint8)
    pack_signs(values[3:], unaligned)  # storage offset 3: not readable as int64
    assert torch.equal(aligned, unaligned)
