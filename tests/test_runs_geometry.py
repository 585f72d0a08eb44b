"""RunsGeometry (tensor-parallel shards) against dense computations on the whole 2-D view."""

import itertools

import pytest
import torch

from dist_memopt.shard.runs import RunsGeometry
from dist_memopt.shard.spec import Run, ShardSpec, cut_runs


def positions(runs):
    return torch.cat([
        (run.start + run.stride * torch.arange(run.count)).unsqueeze(1).add(torch.arange(run.length)).view(-1)
        for run in runs
    ])


CASES = [
    # (rows, cols) view, runs: aligned strides, drifting strides, head/body/tail crossings, mixtures
    ((6, 8), [Run(3, 5, 8, 4)]),                      # inside rows, stride = one view row
    ((6, 8), [Run(2, 13, 16, 3)]),                    # runs cross rows: head, a full row, a tail
    ((10, 6), [Run(1, 4, 7, 6)]),                     # stride 7 on 6 columns: column offset drifts
    ((9, 7), [Run(0, 3, 5, 2), Run(20, 9, 11, 3)]),   # two groups (a gated weight's two blocks)
    ((5, 12), [Run(12, 24)]),                          # one contiguous run
    ((8, 8), [Run(0, 8, 16, 4)]),                     # whole view rows, every other one
    ((6, 4), [Run(1, 9, 12, 2)]),                     # head, a full row and a tail, 3 rows apart
    ((7, 4), [Run(2, 7, 8, 3)]),                      # a run's tail row is the next run's head row
]


@pytest.mark.parametrize("shape,runs", CASES)
def test_runs_geometry_matches_dense(shape, runs):
    rows, cols = shape
    pos = positions(runs)
    geo = RunsGeometry(rows, cols, tuple(runs))
    assert geo.numel == pos.numel()
    x = torch.randn(pos.numel(), dtype=torch.float64)
    dense = torch.zeros(rows * cols, dtype=torch.float64).index_put_((pos,), x).view(rows, cols)
    r = torch.randn(rows, dtype=torch.float64)
    c = torch.randn(cols, dtype=torch.float64)
    full_outer = torch.outer(r, c).view(-1)
    # every window of the local elements, as chunked processing cuts them
    for lo, hi in itertools.combinations(range(0, pos.numel() + 1, 3), 2):
        part = geo.sub(lo, hi)
        sel = torch.zeros(rows * cols, dtype=torch.float64).index_put_((pos[lo:hi],), x[lo:hi]).view(rows, cols)
        rows_out, cols_out = torch.zeros(rows, dtype=torch.float64), torch.zeros(cols, dtype=torch.float64)
        part.add_row_col_sums(x[lo:hi], rows_out, cols_out)
        torch.testing.assert_close(rows_out, sel.sum(1))
        torch.testing.assert_close(cols_out, sel.sum(0))
        weighted = torch.zeros(rows, dtype=torch.float64)
        part.add_weighted_row_sums(x[lo:hi], c, weighted)
        torch.testing.assert_close(weighted, sel @ c)
        weighted = torch.zeros(cols, dtype=torch.float64)
        part.add_weighted_col_sums(x[lo:hi], r, weighted)
        torch.testing.assert_close(weighted, r @ sel)
        torch.testing.assert_close(part.outer(r, c, row_shift=c[0] * r), full_outer[pos[lo:hi]] + c[0] * r[pos[lo:hi] // cols])
    assert torch.equal(dense.view(-1)[pos], x)


def test_shard_spec_runs_normalize_and_take():
    # a column block whose runs touch is one contiguous range
    spec = ShardSpec.of_runs((4, 6), [Run(6, 6, 6, 2)])
    assert spec.is_contiguous and (spec.start, spec.end) == (6, 18)
    spec = ShardSpec.of_runs((4, 6), [Run(2, 3, 6, 4)])
    assert not spec.is_contiguous and spec.numel == 12 and (spec.start, spec.end) == (2, 23)
    full = torch.arange(24.0)
    assert torch.equal(spec.take(full), full.view(4, 6)[:, 2:5].reshape(-1))
    # consecutive single runs one stride apart become a group
    assert ShardSpec.of_runs((4, 6), [Run(2, 3), Run(8, 3), Run(14, 3)]).runs == (Run(2, 3, 6, 3),)
    with pytest.raises(ValueError, match="overlap"):
        Run(0, 4, 2, 3)


@pytest.mark.parametrize("shape, runs", CASES)
def test_cut_runs_is_the_window_of_local_elements(shape, runs):
    """A data-parallel range of a tensor-parallel piece: every window [lo, hi) of local elements."""
    pos = positions(runs)
    for lo, hi in itertools.combinations(range(len(pos) + 1), 2):
        cut = cut_runs(runs, lo, hi)
        assert torch.equal(positions(cut), pos[lo:hi]), (lo, hi, cut)
        assert len(cut) <= 3 * len(runs)  # a head, a strided body and a tail per group
    assert cut_runs(runs, 3, 3) == []
    with pytest.raises(ValueError, match="past the"):
        cut_runs(runs, 0, len(pos) + 1)
