"""1-bit storage of SMMF's sign matrix: 8 signs per uint8 word, least significant bit first.

The papers' released code keeps one byte per sign; packing is what brings SMMF to its memory
figures. Element ``k`` of a range lives in byte ``k // 8``, bit ``k % 8``; the unused high bits of
the last byte are zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["packed_numel", "pack_signs", "unpack_signs"]

_CONSTANTS: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

# Multiplying 8 bytes that are each 0 or 1 (one int64, least significant byte first) by this
# constant puts bit k of the packed byte at bit 56 + k, with no carries into the top byte: eight
# signs become one byte in one multiply and one shift. (Checked exhaustively in the tests.)
_PACK_MULTIPLIER = 0x0102040810204080


def packed_numel(numel: int) -> int:
    """Bytes needed to hold ``numel`` sign bits."""
    return (numel + 7) // 8


def _constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(bit weights 1..128, the pack multiplier, a (256, 8) table of +1/-1 per byte's bits)."""
    if device not in _CONSTANTS:
        shifts = torch.arange(8, dtype=torch.int32, device=device)
        weights = (1 << shifts).to(torch.uint8)
        multiplier = torch.tensor(_PACK_MULTIPLIER, dtype=torch.int64, device=device)
        bits = (torch.arange(256, dtype=torch.int32, device=device).unsqueeze(1) >> shifts) & 1
        _CONSTANTS[device] = (weights, multiplier, bits.to(torch.float32) * 2 - 1)
    return _CONSTANTS[device]


def pack_signs(nonnegative: Tensor, out: Tensor) -> None:
    """Pack a bool tensor (True = sign bit 1 = non-negative) into ``out`` (uint8, in place)."""
    numel = nonnegative.numel()
    if out.numel() != packed_numel(numel):
        raise ValueError(f"sign buffer holds {out.numel()} bytes, {packed_numel(numel)} needed")
    if numel == 0:
        return
    flat = nonnegative.reshape(-1)
    weights, multiplier, _ = _constants(flat.device)
    full = numel // 8
    if full:
        head = flat[: full * 8]
        if head.storage_offset() % 8 == 0:
            words = head.view(torch.int64).mul(multiplier)  # wraps modulo 2**64, as intended
            out[:full].copy_(words.bitwise_right_shift_(56).bitwise_and_(0xFF))
        else:  # an unaligned view cannot be read as int64
            torch.sum(head.view(full, 8).to(torch.uint8).mul_(weights), dim=1, dtype=torch.uint8, out=out[:full])
    rest = numel - full * 8
    if rest:
        out[full] = flat[full * 8 :].to(torch.uint8).mul_(weights[:rest]).sum(dtype=torch.uint8)


def unpack_signs(packed: Tensor, numel: int) -> Tensor:
    """Return ``numel`` signs as float32 +1 (bit set) / -1 (bit clear)."""
    if packed.numel() != packed_numel(numel):
        raise ValueError(f"sign buffer holds {packed.numel()} bytes, {packed_numel(numel)} needed")
    _, _, table = _constants(packed.device)
    return torch.nn.functional.embedding(packed.to(torch.int32), table).view(-1)[:numel]
