"""One geometry's row/column arithmetic for a stack of segments that share it.

On one rank, many segments have the same (rows, cols) view and the same place in it: every
transformer block's shard of a same-shaped weight under FSDP2, FSDP1, ZeRO or Megatron's
distributed optimizer, or the whole small tensors of a single process. Stepped as one (B, numel)
stack, each operation of the step runs once for all of them. :class:`StackedGeometry` gives such a
stack the interface of :class:`~dist_memopt.shard.geometry.RangeGeometry`, with a leading batch
dimension on every tensor: data (B, numel), row factors and sums (B, rows), column ones (B, cols).

A contiguous range's own operations take the batch as leading dimensions, so a stack of any size
calls them directly; strided runs step one segment at a time (a stack of one, on the row's views).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor

from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.runs import RunsGeometry

__all__ = ["StackedGeometry"]

Geometry = Union[RangeGeometry, RunsGeometry]


@dataclass(frozen=True)
class StackedGeometry:
    """``count`` segments, each the range (or runs) ``geometry`` of its own (rows, cols) view."""

    geometry: Geometry
    count: int

    def __post_init__(self) -> None:
        if self.count > 1 and not isinstance(self.geometry, RangeGeometry):
            raise ValueError("only contiguous ranges stack; strided runs step one segment at a time")

    @property
    def rows(self) -> int:
        return self.geometry.rows

    @property
    def cols(self) -> int:
        return self.geometry.cols

    @property
    def numel(self) -> int:
        return self.geometry.numel

    def sub(self, lo: int, hi: int) -> "StackedGeometry":
        """Elements ``[lo, hi)`` of every segment (for processing the stack in chunks)."""
        return StackedGeometry(self.geometry.sub(lo, hi), self.count)

    # --- reductions (accumulating into the outputs, as the geometry's own) ---------------------
    # A range's own reductions take the batch as leading dimensions; runs step one segment.

    def _batch(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if isinstance(self.geometry, RangeGeometry):
            return tensors
        return tuple(t[0] for t in tensors)

    def add_row_col_sums(self, x: Tensor, rows_out: Tensor, cols_out: Tensor) -> None:
        self.geometry.add_row_col_sums(*self._batch(x, rows_out, cols_out))

    def add_weighted_row_sums(self, x: Tensor, col_weights: Tensor, rows_out: Tensor) -> None:
        """``rows_out[b, i] += Σ_j x[b, i, j]·col_weights[b, j]`` over the range."""
        self.geometry.add_weighted_row_sums(*self._batch(x, col_weights, rows_out))

    def add_weighted_col_sums(self, x: Tensor, row_weights: Tensor, cols_out: Tensor) -> None:
        """``cols_out[b, j] += Σ_i row_weights[b, i]·x[b, i, j]`` over the range."""
        self.geometry.add_weighted_col_sums(*self._batch(x, row_weights, cols_out))

    # --- decompression ---------------------------------------------------------------------------

    @property
    def outer_numel(self) -> int:
        """Elements :meth:`outer` computes for the whole stack."""
        return self.count * self.geometry.outer_numel

    def outer(self, row_factor: Tensor, col_factor: Tensor, row_shift: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
        """(B, numel): ``row_factor[b] ⊗ col_factor[b]``, plus ``row_shift[b, i]`` on row i, over the
        range; into ``out`` (a flat buffer of at least :attr:`outer_numel` elements) when given."""
        if isinstance(self.geometry, RangeGeometry):
            return self.geometry.outer(row_factor, col_factor, row_shift, out)
        one = None if row_shift is None else row_shift[0]
        return self.geometry.outer(row_factor[0], col_factor[0], one, out).unsqueeze(0)
