"""1-bit storage of SMMF's sign matrix: 8 signs per uint8 word, least significant bit first.

The papers' released code keeps one byte per sign; packing is what brings SMMF to its memory
figures. Element ``k`` of a range lives in byte ``k // 8``, bit ``k % 8``; the unused high bits of
the last byte are zero.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["packed_numel", "pack_signs", "unpack_signs", "pack_sign_rows", "unpack_sign_rows"]

_WEIGHTS: dict[torch.device, Tensor] = {}
_SIGN_TABLES: dict[torch.device, Tensor] = {}


def packed_numel(numel: int) -> int:
    """Bytes needed to hold ``numel`` sign bits."""
    return (numel + 7) // 8


def _bit_weights(device: torch.device) -> Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = (2 ** torch.arange(8, dtype=torch.int32, device=device)).to(torch.uint8)
    return _WEIGHTS[device]


def _sign_table(device: torch.device) -> Tensor:
    """(256, 8) float32 table: row b holds +1/-1 for the 8 bits of byte b."""
    if device not in _SIGN_TABLES:
        bits = torch.arange(256, dtype=torch.int32, device=device).unsqueeze(1)
        ones = (bits >> torch.arange(8, dtype=torch.int32, device=device)) & 1
        _SIGN_TABLES[device] = ones.to(torch.float32) * 2 - 1
    return _SIGN_TABLES[device]


#: Σ_k 2^(56 − 7k): multiplying eight 0/1 bytes (byte k at bit 8k) by it puts byte k's bit at
#: bit 56 + k, and every cross term at a distinct bit below 56 or past bit 63 (no carries)
_GATHER_BITS = 0x0102040810204080


def pack_signs(nonnegative: Tensor, out: Tensor, overwrite: bool = False) -> None:
    """Pack a bool tensor (True = sign bit 1 = non-negative) into ``out`` (uint8, in place).

    Eight bools are eight bytes of 0/1, read as one int64 word (little-endian: element k is byte
    k). One wrapping multiply gathers bit 8k into bit 56 + k, and a shift brings that top byte
    down: three passes over N/8 words. With
    ``overwrite`` the bools are scratch, and the words are gathered in place.
    """
    numel = nonnegative.numel()
    if out.numel() != packed_numel(numel):
        raise ValueError(f"sign buffer holds {out.numel()} bytes, {packed_numel(numel)} needed")
    if numel == 0:
        return
    flat = nonnegative.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat.bool()
    full = numel // 8
    if full:
        bools = flat[: full * 8]
        if bools.storage_offset() % 8 or not bools.is_contiguous():
            # an int64 view needs contiguous bytes starting on a word boundary
            bools = bools.clone(memory_format=torch.contiguous_format)
            overwrite = True  # our own copy
        words = bools.view(torch.uint8).view(torch.int64)
        gathered = words.mul_(_GATHER_BITS) if overwrite else words.mul(_GATHER_BITS)
        gathered.bitwise_right_shift_(56)  # low byte: elements 0..7
        out[:full].copy_(gathered)  # int64 -> uint8 keeps the lowest byte
    rest = numel - full * 8
    if rest:
        last = flat[full * 8 :].to(torch.uint8).mul_(_bit_weights(flat.device)[:rest])
        out[full] = last.sum(dtype=torch.uint8)


def unpack_signs(packed: Tensor, numel: int, out: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Tensor:
    """Return ``numel`` signs as float32 +1 (bit set) / -1 (bit clear).

    ``out`` (float32, at least 8 per byte) and ``index`` (int32, one per byte) are optional flat
    buffers for the signs and the table indices.
    """
    if packed.numel() != packed_numel(numel):
        raise ValueError(f"sign buffer holds {packed.numel()} bytes, {packed_numel(numel)} needed")
    return _lookup(packed.reshape(-1), out, index)[:numel]


def _lookup(flat: Tensor, out: Optional[Tensor], index: Optional[Tensor]) -> Tensor:
    """Flat float32 signs of every bit of ``flat`` (uint8), 8 per byte, padding bits included."""
    table = _sign_table(flat.device)
    # index_select is several times faster than advanced indexing (table[...]) on CPU; int32
    # indices are half the bytes of int64 ones
    indices = flat.int() if index is None else index[: flat.numel()].copy_(flat)
    rows = None if out is None else out[: flat.numel() * 8].view(-1, 8)
    return torch.index_select(table, 0, indices, out=rows).view(-1)


def unpack_sign_rows(packed: Tensor, numel: int, out: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Tensor:
    """(B, numel) signs from (B, bytes) packed rows, each row a segment's bytes (its own padding);
    ``out`` and ``index`` as in :func:`unpack_signs`."""
    count, words = packed.shape
    return _lookup(packed.reshape(-1), out, index).view(count, words * 8)[:, :numel]


def pack_sign_rows(nonnegative: Tensor, out: Tensor, overwrite: bool = False) -> None:
    """Pack (B, numel) bools into (B, bytes) rows of ``out`` (in place), padding bits 0 per row;
    with ``overwrite`` the bools are scratch (see :func:`pack_signs`)."""
    if out.shape[0] == 1:
        return pack_signs(nonnegative[0], out[0], overwrite)
    count, words = out.shape
    numel = nonnegative.shape[1]
    if numel != words * 8:
        padded = nonnegative.new_zeros(count, words * 8)
        padded[:, :numel] = nonnegative
        nonnegative, overwrite = padded, True
    if out.is_contiguous():
        pack_signs(nonnegative.reshape(-1), out.view(-1), overwrite)
    else:
        packed = out.new_empty(count * words)
        pack_signs(nonnegative.reshape(-1), packed, overwrite)
        out.copy_(packed.view(count, words))
