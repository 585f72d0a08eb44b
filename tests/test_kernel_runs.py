"""What the kernels tile: a geometry's window as shard runs (:func:`runs_of`), and its int64 fields."""

from __future__ import annotations

import pytest
import torch

from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.runs import RunsGeometry, runs_of
from dist_memopt.shard.spec import Run


def test_a_range_is_one_run():
    assert runs_of(RangeGeometry(4, 5, 3, 17)) == (Run(3, 14),)
    assert runs_of(RangeGeometry(4, 5, 7, 7)) == ()


def test_every_window_of_strided_runs_holds_the_same_positions():
    pieces = (Run(1, 3, 7, 4), Run(4, 2, 7, 4), Run(40, 5, 5, 1))
    geometry = RunsGeometry(9, 5, pieces)
    positions = torch.cat([p.positions() for p in pieces])
    for lo in range(positions.numel() + 1):
        for hi in range(lo, positions.numel() + 1):
            cut = runs_of(geometry.sub(lo, hi))
            got = torch.cat([p.positions() for p in cut]) if cut else torch.zeros(0, dtype=torch.long)
            assert torch.equal(got, positions[lo:hi]), (lo, hi, cut)
            assert all(p.numel > 0 for p in cut) and len(cut) <= 3 * len(pieces)


def test_run_groups_of_the_shard_spec_are_read_too():
    cut = runs_of(RunsGeometry(3, 5, (Run(10, 4), Run(0, 2, 5, 3)), 1, 9))
    assert torch.equal(torch.cat([p.positions() for p in cut]), torch.tensor([11, 12, 13, 0, 1, 5, 6, 10]))


def test_tile_fields_give_a_single_piece_the_views_size_as_stride():
    """A single piece (stride 0 in a Run) tiles with the view's size as its stride: never 0 (the
    dividing index math divides by it), at least a column block (the strided math carries by it
    once per block), and past every position (only its piece 0 is held)."""
    pytest.importorskip("triton")
    from dist_memopt.kernels.tiles import tile_pieces

    geometry = RunsGeometry(8, 5, (Run(3, 4, 10, 4),), 2, 13)  # a partial run, two whole runs, a partial one
    assert list(tile_pieces(geometry, 2)) == [
        [5, 2, 40, 1, 0, 1],
        [13, 4, 10, 2, 2, 2], [13, 4, 10, 2, 2, 4],
        [33, 1, 40, 1, 10, 6],
    ]
