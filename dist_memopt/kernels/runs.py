"""A segment's local elements as strided runs of the parameter's row-major flattening.

``Runs(start, run_length, stride, count)``: local element ``k`` sits at global flat position
``start + (k // run_length) * stride + k % run_length``, and in the (rows, cols) view at
``(pos // cols, pos % cols)``. A contiguous range is one run (``count=1``); a tensor-parallel
box of a matrix is ``count`` rows of ``run_length`` columns, ``stride`` apart. The kernels take
a tuple of them per segment, so a geometry only ever adds pieces to this description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Runs", "runs_of"]


@dataclass(frozen=True)
class Runs:
    start: int
    run_length: int
    stride: int
    count: int

    def __post_init__(self) -> None:
        if self.run_length < 0 or self.count < 0 or (self.count > 1 and self.stride < self.run_length):
            raise ValueError(f"runs must not overlap and have non-negative sizes: {self}")

    @property
    def numel(self) -> int:
        return self.run_length * self.count

    @property
    def span(self) -> int:
        """Global positions from the first element to one past the last."""
        return 0 if self.numel == 0 else (self.count - 1) * self.stride + self.run_length

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """Global flat position of every local element, in local order (for tests and the torch side)."""
        k = torch.arange(self.numel, device=device)
        return self.start + (k // max(1, self.run_length)) * self.stride + k % max(1, self.run_length)


def runs_of(geometry: Any) -> tuple[Runs, ...]:
    """The runs of a segment geometry, in local order.

    A geometry with ``runs`` (run groups with ``start``, ``length`` or ``run_length``, ``stride``,
    ``count``; the shape of :class:`dist_memopt.shard.spec.Run`) and optionally a local window
    ``[lo, hi)`` gives those runs cut to the window; any other is a contiguous ``[start, end)``.
    """
    groups = getattr(geometry, "runs", None)
    if groups is None:
        numel = geometry.end - geometry.start
        return (Runs(geometry.start, numel, max(1, numel), 1),) if numel else ()
    pieces = []
    for group in groups:
        length = getattr(group, "run_length", None) or group.length
        pieces.append(Runs(group.start, length, group.stride if group.count > 1 else length, group.count))
    total = sum(p.numel for p in pieces)
    lo, hi = getattr(geometry, "lo", 0), getattr(geometry, "hi", total)
    return tuple(window(pieces, lo, total if hi is None or hi < 0 else hi))


def window(pieces: list[Runs], lo: int, hi: int) -> list[Runs]:
    """Local elements ``[lo, hi)`` of ``pieces`` (listed in local order) as runs: a window cutting a
    run leaves a partial first and last run, each a one-run piece."""
    out, offset = [], 0
    for piece in pieces:
        a, b = max(lo, offset) - offset, min(hi, offset + piece.numel) - offset
        if a < b:
            out += _cut(piece, a, b)
        offset += piece.numel
    return out


def _cut(piece: Runs, a: int, b: int) -> list[Runs]:
    length, stride = piece.run_length, piece.stride
    first, first_in = divmod(a, length)
    last, last_in = divmod(b, length)
    if first == last:
        return [Runs(piece.start + first * stride + first_in, b - a, b - a, 1)]
    out = []
    if first_in:
        out.append(Runs(piece.start + first * stride + first_in, length - first_in, length - first_in, 1))
        first += 1
    if last > first:
        out.append(Runs(piece.start + first * stride, length, stride if last - first > 1 else length, last - first))
    if last_in:
        out.append(Runs(piece.start + last * stride, last_in, last_in, 1))
    return out
