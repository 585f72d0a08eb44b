"""Where a contiguous range of a tensor's flattening falls in its 2-D factorization view.

Both optimizers keep row and column statistics of a 2-D view (n, m) of each parameter. Every
sharding system hands a rank one contiguous range [start, end) of the parameter's row-major
flattening; in the 2-D view that range is a partial first row, some full rows and a partial last
row. :class:`RangeGeometry` does the arithmetic for that decomposition once, so that row sums,
column sums and outer products restricted to the range need no copies of the local data.

The matricization rules live here too: they depend only on the *global* shape, never on a shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["square_matricize", "balanced_split", "RangeGeometry"]


def square_matricize(numel: int) -> tuple[int, int]:
    """SMMF Algorithm 2: view ``numel`` elements as ``(numel // i, i)``.

    ``i`` is the largest divisor of ``numel`` with ``i <= sqrt(numel)``, so the result is the
    factorization closest to square, with rows >= columns. A prime gives ``(numel, 1)``.
    """
    if numel < 1:
        raise ValueError(f"square_matricize needs a positive element count, got {numel}")
    for i in range(math.isqrt(numel), 0, -1):
        if numel % i == 0:
            return numel // i, i
    raise AssertionError("unreachable: 1 divides every integer")


def balanced_split(shape: Sequence[int]) -> tuple[int, int]:
    """Alada eq. (12): split the dims of a rank >= 2 tensor into (leading, trailing) products.

    Picks the split point j (1 <= j < rank) minimising |prod(shape[:j]) - prod(shape[j:])|, the
    first such j on ties. Rank <= 1 tensors have no split between dims and fall back to
    :func:`square_matricize` (as in SMMF).
    """
    dims = [int(d) for d in shape]
    if len(dims) <= 1:
        return square_matricize(math.prod(dims))
    best: tuple[int, int] | None = None
    best_gap = -1
    for j in range(1, len(dims)):
        lead, trail = math.prod(dims[:j]), math.prod(dims[j:])
        gap = abs(lead - trail)
        if best is None or gap < best_gap:
            best, best_gap = (lead, trail), gap
    assert best is not None
    return best


@dataclass(frozen=True)
class RangeGeometry:
    """The flat range ``[start, end)`` of an ``(rows, cols)`` row-major matrix.

    The range splits into ``head`` elements finishing a partial first row, ``body_rows`` full
    rows, and ``tail`` elements starting a partial last row (when the range lies inside one row,
    it is all head). ``row0`` is the first row touched and ``touched_rows`` how many rows are.
    """

    rows: int
    cols: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end <= self.rows * self.cols):
            raise ValueError(
                f"range [{self.start}, {self.end}) does not fit a {self.rows}x{self.cols} matrix"
            )

    # cached: a chunk loop asks for these dozens of times per chunk (a frozen dataclass still has a
    # __dict__ for cached_property; equality and hashing see the four fields only)
    @cached_property
    def numel(self) -> int:
        return self.end - self.start

    @cached_property
    def row0(self) -> int:
        return self.start // self.cols

    @cached_property
    def col0(self) -> int:
        return self.start % self.cols

    @cached_property
    def head(self) -> int:
        """Elements in a partial first row (0 when the range starts on a row boundary)."""
        if self.col0 == 0:
            return 0
        return min(self.numel, self.cols - self.col0)

    @cached_property
    def body_rows(self) -> int:
        return (self.numel - self.head) // self.cols

    @cached_property
    def tail(self) -> int:
        return self.numel - self.head - self.body_rows * self.cols

    @cached_property
    def touched_rows(self) -> int:
        return (1 if self.head else 0) + self.body_rows + (1 if self.tail else 0)

    def sub(self, lo: int, hi: int) -> "RangeGeometry":
        """The geometry of elements ``[lo, hi)`` of this range (for processing it in chunks)."""
        return RangeGeometry(self.rows, self.cols, self.start + lo, self.start + hi)

    # --- reductions restricted to the range (accumulating: callers start from zeros) -------
    # Leading dimensions of every tensor are a batch: a stack of segments with this geometry
    # (see dist_memopt.shard.stacked), one op per piece for all of them.

    def _pieces(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., numel) -> head (..., head), body (..., body_rows, cols), tail (..., tail)."""
        h, nb, m = self.head, self.body_rows, self.cols
        return x[..., :h], x[..., h : h + nb * m].reshape(*x.shape[:-1], nb, m), x[..., h + nb * m :]

    def add_row_col_sums(self, x: Tensor, rows_out: Tensor, cols_out: Tensor) -> None:
        """Add this range's row sums and column sums of ``x`` (length ``numel``) to the outputs.

        ``rows_out`` has ``rows`` entries and ``cols_out`` has ``cols``; rows outside the range get
        nothing, so adding the contributions of all ranks gives the full matrix's sums.
        """
        if self.numel == 0:
            return
        head, body, tail = self._pieces(x)
        r = self.row0
        if self.head:
            rows_out[..., r].add_(head.sum(-1))
            cols_out[..., self.col0 : self.col0 + self.head].add_(head)
            r += 1
        if self.body_rows:
            rows_out[..., r : r + self.body_rows].add_(body.sum(-1))
            cols_out.add_(body.sum(-2))
            r += self.body_rows
        if self.tail:
            rows_out[..., r].add_(tail.sum(-1))
            cols_out[..., : self.tail].add_(tail)

    def add_weighted_row_sums(self, x: Tensor, col_weights: Tensor, rows_out: Tensor) -> None:
        """``rows_out[i] += sum_j x[i, j] * col_weights[j]`` over this range."""
        if self.numel == 0:
            return
        head, body, tail = self._pieces(x)
        r = self.row0
        if self.head:
            rows_out[..., r].add_(_dot(head, col_weights[..., self.col0 : self.col0 + self.head]))
            r += 1
        if self.body_rows:
            rows_out[..., r : r + self.body_rows].add_((body @ col_weights.unsqueeze(-1))[..., 0])
            r += self.body_rows
        if self.tail:
            rows_out[..., r].add_(_dot(tail, col_weights[..., : self.tail]))

    def add_weighted_col_sums(self, x: Tensor, row_weights: Tensor, cols_out: Tensor) -> None:
        """``cols_out[j] += sum_i row_weights[i] * x[i, j]`` over this range."""
        if self.numel == 0:
            return
        head, body, tail = self._pieces(x)
        r = self.row0
        if self.head:
            cols_out[..., self.col0 : self.col0 + self.head].add_(head * row_weights[..., r : r + 1])
            r += 1
        if self.body_rows:
            cols_out.add_((row_weights[..., r : r + self.body_rows].unsqueeze(-2) @ body)[..., 0, :])
            r += self.body_rows
        if self.tail:
            cols_out[..., : self.tail].add_(tail * row_weights[..., r : r + 1])

    # --- decompression restricted to the range ----------------------------------------------

    @property
    def outer_numel(self) -> int:
        """Elements :meth:`outer` computes: the touched rows, whole."""
        return self.touched_rows * self.cols

    def outer(self, row_factor: Tensor, col_factor: Tensor, row_shift: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
        """``row_factor ⊗ col_factor``, plus ``row_shift[i]`` on row i, flattened, restricted to the range.

        Leading dimensions are a batch, as in the reductions: (..., rows) row factors and shifts,
        (..., cols) column factors, (..., numel) result. Computes the touched rows only
        (:attr:`outer_numel` per segment, at most ``numel + 2 * cols`` products) into ``out`` (a
        flat buffer of at least that many elements per segment) or a new tensor, and returns the
        slice that belongs to the range.
        """
        batch = row_factor.shape[:-1]
        if self.numel == 0:
            return row_factor.new_empty(*batch, 0)
        touched = slice(self.row0, self.row0 + self.touched_rows)
        shape = (*batch, self.touched_rows, self.cols)
        into = None if out is None else out[: math.prod(shape)].view(shape)
        block = torch.mul(row_factor[..., touched].unsqueeze(-1), col_factor.unsqueeze(-2), out=into)
        if row_shift is not None:
            block.add_(row_shift[..., touched].unsqueeze(-1))
        return block.view(*batch, -1)[..., self.col0 : self.col0 + self.numel]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ over the last dimension of a·b, one matrix product for any leading (batch) dimensions."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]
