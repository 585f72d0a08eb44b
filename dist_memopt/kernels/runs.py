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
    """The runs of a segment geometry: its own ``runs()`` when it has one, else a contiguous range."""
    if hasattr(geometry, "runs"):
        return tuple(geometry.runs())
    numel = geometry.end - geometry.start
    return (Runs(geometry.start, numel, max(1, numel), 1),) if numel else ()
