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


@pytest.mark.parametrize("offset", [0, 1, 3, 8, 13])
def test_packing_a_view_at_any_offset_or_stride(offset):
    g = torch.Generator().manual_seed(offset)
    values = torch.randn(offset + 1003, generator=g)
    view = (values >= 0)[offset:]  # storage offset not a multiple of 8
    strided = (values[: 2 * 400] >= 0)[::2]  # non-contiguous
    for signs in (view, strided):
        packed = torch.empty(packed_numel(signs.numel()), dtype=torch.uint8)
        pack_signs(signs, packed)
        expected = torch.empty_like(packed)
        pack_signs(signs.contiguous().clone(), expected)
        assert torch.equal(packed, expected)
        assert torch.equal(unpack_signs(packed, signs.numel()), torch.where(signs, 1.0, -1.0))


def test_every_byte_value_round_trips():
    bits = torch.arange(256).unsqueeze(1).bitwise_right_shift(torch.arange(8)).bitwise_and(1).bool()
    packed = torch.empty(256, dtype=torch.uint8)
    pack_signs(bits.reshape(-1), packed)
    assert packed.tolist() == list(range(256))
    assert torch.equal(unpack_signs(packed, 2048), torch.where(bits.reshape(-1), 1.0, -1.0))
