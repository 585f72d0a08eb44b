"""Where a tensor-parallel shard's elements fall in its parameter's 2-D factorization view.

A tensor-parallel shard is not one range of the row-major flattening: a row-wise layer's column
block is ``rows`` runs of ``cols`` elements, one global row apart (see :class:`~dist_memopt.shard.
spec.Run`). :class:`RunsGeometry` gives such a shard the interface of
:class:`~dist_memopt.shard.geometry.RangeGeometry` — row/column sums at their *global* positions
in the (rows, cols) view, outer products restricted to the shard — so the optimizers' math stays
written once. Every operation is vectorized over runs:

- a partial run at either end of a window is a contiguous range (a ``RangeGeometry``);
- whole runs whose stride is a multiple of the view's row length all cross the view's rows the
  same way (same column offset, same head/body/tail split), so each piece is a strided
  (runs × elements) block, and its rows' factors and sums are strided views too;
- any other whole runs (their column offset drifts from run to run) gather their view rows and
  columns by position, computed per chunk and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.spec import Run, ShardSpec, cut_runs, window_runs

__all__ = ["RunsGeometry", "view_geometry", "runs_of"]


@dataclass(frozen=True)
class RunsGeometry:
    """Local elements ``[lo, hi)`` of run groups ``runs`` in a ``(rows, cols)`` row-major matrix."""

    rows: int
    cols: int
    runs: tuple[Run, ...]
    lo: int = 0
    hi: int = -1

    def __post_init__(self) -> None:
        total = sum(run.numel for run in self.runs)
        if self.hi < 0:
            object.__setattr__(self, "hi", total)
        if not (0 <= self.lo <= self.hi <= total) or (self.runs and self.runs[-1].last > self.rows * self.cols):
            raise ValueError(f"runs {self.runs} [{self.lo}, {self.hi}) do not fit a {self.rows}x{self.cols} matrix")

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def sub(self, lo: int, hi: int) -> "RunsGeometry":
        """The geometry of elements ``[lo, hi)`` of this window (for processing it in chunks)."""
        return RunsGeometry(self.rows, self.cols, self.runs, self.lo + lo, self.lo + hi)

    def _pieces(self) -> Iterator[tuple[int, Union[RangeGeometry, Run]]]:
        """(offset in the window, piece): partial runs as contiguous ranges, whole runs as run groups."""
        at = 0
        for piece, whole in window_runs(self.runs, self.lo, self.hi):
            yield at, piece if whole else RangeGeometry(self.rows, self.cols, piece.start, piece.last)
            at += piece.numel

    def _aligned(self, whole: Run) -> bool:
        return whole.count == 1 or whole.stride % self.cols == 0

    # --- reductions restricted to the window (accumulating: callers start from zeros) --------

    def add_row_col_sums(self, x: Tensor, rows_out: Tensor, cols_out: Tensor) -> None:
        """Add the window's row sums and column sums of ``x`` (length ``numel``) to the outputs."""
        for at, piece in self._pieces():
            part = x[at : at + piece.numel]
            if isinstance(piece, RangeGeometry):
                piece.add_row_col_sums(part, rows_out, cols_out)
            elif self._aligned(piece):
                for block, rows_of, col_lo in self._blocks(piece, part):
                    rows_of(rows_out).add_(block.sum(-1))
                    cols_out[col_lo : col_lo + block.shape[-1]].add_(block.sum(dim=tuple(range(block.dim() - 1))))
            else:
                row_index, col_index = self._positions(piece, x.device)
                rows_out.index_add_(0, row_index, part)
                cols_out.index_add_(0, col_index, part)

    def add_weighted_row_sums(self, x: Tensor, col_weights: Tensor, rows_out: Tensor) -> None:
        """``rows_out[i] += sum_j x[i, j] * col_weights[j]`` over the window."""
        for at, piece in self._pieces():
            part = x[at : at + piece.numel]
            if isinstance(piece, RangeGeometry):
                piece.add_weighted_row_sums(part, col_weights, rows_out)
            elif self._aligned(piece):
                for block, rows_of, col_lo in self._blocks(piece, part):
                    rows_of(rows_out).add_(block @ col_weights[col_lo : col_lo + block.shape[-1]])
            else:
                row_index, col_index = self._positions(piece, x.device)
                rows_out.index_add_(0, row_index, part * col_weights[col_index])

    def add_weighted_col_sums(self, x: Tensor, row_weights: Tensor, cols_out: Tensor) -> None:
        """``cols_out[j] += sum_i row_weights[i] * x[i, j]`` over the window."""
        for at, piece in self._pieces():
            part = x[at : at + piece.numel]
            if isinstance(piece, RangeGeometry):
                piece.add_weighted_col_sums(part, row_weights, cols_out)
            elif self._aligned(piece):
                for block, rows_of, col_lo in self._blocks(piece, part):
                    weights = rows_of(row_weights)
                    cols_out[col_lo : col_lo + block.shape[-1]].add_(torch.tensordot(weights, block, dims=weights.dim()))
            else:
                row_index, col_index = self._positions(piece, x.device)
                cols_out.index_add_(0, col_index, part * row_weights[row_index])

    # --- decompression restricted to the window -----------------------------------------------

    @property
    def outer_numel(self) -> int:
        """Elements :meth:`outer` writes: the window's own."""
        return self.numel

    def outer(self, row_factor: Tensor, col_factor: Tensor, row_shift: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
        """``row_factor ⊗ col_factor``, plus ``row_shift[i]`` on row i, flattened, restricted to the
        window; into ``out`` (a flat buffer of at least ``numel`` elements) when given."""
        dtype = torch.promote_types(row_factor.dtype, col_factor.dtype)
        out = row_factor.new_empty(self.numel, dtype=dtype) if out is None else out[: self.numel]
        for at, piece in self._pieces():
            part = out[at : at + piece.numel]
            if isinstance(piece, RangeGeometry):
                part.copy_(piece.outer(row_factor, col_factor, row_shift))
            elif self._aligned(piece):
                for block, rows_of, col_lo in self._blocks(piece, part):
                    cols = col_factor[col_lo : col_lo + block.shape[-1]]
                    torch.mul(rows_of(row_factor).unsqueeze(-1), cols, out=block)
                    if row_shift is not None:
                        block.add_(rows_of(row_shift).unsqueeze(-1))
            else:
                row_index, col_index = self._positions(piece, out.device)
                torch.mul(row_factor[row_index], col_factor[col_index], out=part)
                if row_shift is not None:
                    part.add_(row_shift[row_index])
        return out

    # --- the two ways of locating whole runs ----------------------------------------------------

    def _blocks(self, whole: Run, x: Tensor) -> Iterator[tuple[Tensor, Callable[[Tensor], Tensor], int]]:
        """``(block, rows_of, col_lo)`` views of ``x`` (the whole runs' elements) for aligned runs.

        Every run crosses the view's rows alike: a head finishing a row, ``body`` full rows, a
        tail starting one, and the next run does the same ``stride // cols`` rows further down.
        ``block`` is (runs, elements) or (runs, rows, cols); ``rows_of(t)`` is the strided view of
        a per-row vector ``t`` (factors, sums) at the block's rows, shaped like ``block.shape[:-1]``
        (no index, no gather); the columns are ``col_lo`` onwards.
        """
        shape = RangeGeometry(self.rows, self.cols, whole.start, whole.start + whole.length)
        step = whole.stride // self.cols if whole.count > 1 else 0
        first = shape.row0
        runs = x.view(whole.count, whole.length)
        h, nb, m = shape.head, shape.body_rows, self.cols
        if h:
            yield runs[:, :h], _strided(first, (whole.count,), (step,)), shape.col0
            first += 1
        if nb:
            yield runs[:, h : h + nb * m].view(whole.count, nb, m), _strided(first, (whole.count, nb), (step, 1)), 0
            first += nb
        if shape.tail:
            yield runs[:, h + nb * m :], _strided(first, (whole.count,), (step,)), 0

    def _positions(self, whole: Run, device: torch.device) -> tuple[Tensor, Tensor]:
        """View row and column of every element of ``whole`` (computed, not stored)."""
        flat = whole.positions(device)
        row_index = torch.div(flat, self.cols, rounding_mode="floor")
        return row_index, flat - row_index * self.cols


def _strided(first: int, sizes: tuple[int, ...], steps: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """A function giving the view of a 1-D tensor at rows ``first + Σ index·step``."""

    def rows_of(t: Tensor) -> Tensor:
        unit = t.stride(0)
        return t.as_strided(sizes, tuple(s * unit for s in steps), t.storage_offset() + first * unit)

    return rows_of


def view_geometry(rows: int, cols: int, spec: ShardSpec) -> Union[RangeGeometry, RunsGeometry]:
    """The geometry of a shard's positions in the (rows, cols) view of its whole parameter."""
    if spec.runs is None:
        return RangeGeometry(rows, cols, spec.start, spec.end)
    return RunsGeometry(rows, cols, spec.runs)


def runs_of(geometry: Union[RangeGeometry, RunsGeometry]) -> tuple[Run, ...]:
    """A (possibly windowed) geometry's elements as runs of global flat positions, in local order.

    What the fused kernels tile (:func:`dist_memopt.kernels.tiles.tile_pieces`): a contiguous range
    is one run, a window of run groups is cut by :func:`~dist_memopt.shard.spec.cut_runs`, the
    same cut the torch path makes; an empty geometry has no runs.
    """
    if isinstance(geometry, RunsGeometry):
        return tuple(cut_runs(geometry.runs, geometry.lo, geometry.hi))
    return (Run(geometry.start, geometry.numel),) if geometry.numel else ()
