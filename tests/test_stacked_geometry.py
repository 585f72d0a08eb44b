"""StackedGeometry: a stack's batched row/column arithmetic equals each segment's own, range by range."""

import pytest
import torch

from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.stacked import StackedGeometry

ROWS, COLS, COUNT = 7, 5, 3
# whole view, aligned rows, partial first and last rows, inside one row, a lone tail, empty
RANGES = [(0, 35), (5, 20), (3, 31), (6, 9), (30, 33), (12, 12)]


@pytest.mark.parametrize("start, end", RANGES)
def test_stacked_operations_equal_each_segment_alone(start, end):
    geo = RangeGeometry(ROWS, COLS, start, end)
    stacked = StackedGeometry(geo, COUNT)
    generator = torch.Generator().manual_seed(start * 100 + end)
    x = torch.randn(COUNT, geo.numel, generator=generator)
    rows, cols = torch.rand(COUNT, ROWS, generator=generator), torch.rand(COUNT, COLS, generator=generator)
    shift = torch.randn(COUNT, ROWS, generator=generator)

    sums = torch.zeros(COUNT, ROWS), torch.zeros(COUNT, COLS)
    weighted = torch.zeros(COUNT, ROWS), torch.zeros(COUNT, COLS)
    stacked.add_row_col_sums(x, *sums)
    stacked.add_weighted_row_sums(x, cols, weighted[0])
    stacked.add_weighted_col_sums(x, rows, weighted[1])
    outer = stacked.outer(rows, cols, shift)
    for b in range(COUNT):
        one_rows, one_cols = torch.zeros(ROWS), torch.zeros(COLS)
        geo.add_row_col_sums(x[b], one_rows, one_cols)
        torch.testing.assert_close(sums[0][b], one_rows)
        torch.testing.assert_close(sums[1][b], one_cols)
        one_rows.zero_(), one_cols.zero_()
        geo.add_weighted_row_sums(x[b], cols[b], one_rows)
        geo.add_weighted_col_sums(x[b], rows[b], one_cols)
        torch.testing.assert_close(weighted[0][b], one_rows)
        torch.testing.assert_close(weighted[1][b], one_cols)
        torch.testing.assert_close(outer[b], geo.outer(rows[b], cols[b], shift[b]))


def test_a_stack_of_one_is_the_segment_itself():
    geo = RangeGeometry(ROWS, COLS, 3, 31)
    x = torch.randn(1, geo.numel)
    rows, cols = torch.zeros(1, ROWS), torch.zeros(1, COLS)
    StackedGeometry(geo, 1).add_row_col_sums(x, rows, cols)
    alone_rows, alone_cols = torch.zeros(ROWS), torch.zeros(COLS)
    geo.add_row_col_sums(x[0], alone_rows, alone_cols)
    assert torch.equal(rows[0], alone_rows) and torch.equal(cols[0], alone_cols)  # the same ops, bit for bit


def test_strided_runs_do_not_stack():
    from dist_memopt.shard.runs import RunsGeometry
    from dist_memopt.shard.spec import Run

    runs = RunsGeometry(6, 4, (Run(0, 2, 4, 6),))
    StackedGeometry(runs, 1)  # alone is fine
    with pytest.raises(ValueError, match="strided runs"):
        StackedGeometry(runs, 2)
