"""Runs: the kernels' description of a segment's elements, and windows cut from it."""

from __future__ import annotations

import torch

from dist_memopt.kernels.runs import Runs, runs_of, window
from dist_memopt.shard.geometry import RangeGeometry


def test_a_range_is_one_run():
    assert runs_of(RangeGeometry(4, 5, 3, 17)) == (Runs(3, 14, 14, 1),)
    assert runs_of(RangeGeometry(4, 5, 7, 7)) == ()


def test_every_window_of_strided_runs_holds_the_same_positions():
    pieces = [Runs(1, 3, 7, 4), Runs(4, 2, 7, 4), Runs(40, 5, 5, 1)]
    positions = torch.cat([p.positions() for p in pieces])
    for lo in range(positions.numel() + 1):
        for hi in range(lo, positions.numel() + 1):
            cut = window(pieces, lo, hi)
            got = torch.cat([p.positions() for p in cut]) if cut else torch.zeros(0, dtype=torch.long)
            assert torch.equal(got, positions[lo:hi]), (lo, hi, cut)
            assert all(p.numel > 0 for p in cut) and len(cut) <= 3 * len(pieces)


class _RunGroup:  # the shape of dist_memopt.shard.spec.Run: `length`, stride 0 for a single run
    def __init__(self, start, length, stride=0, count=1):
        self.start, self.length, self.stride, self.count = start, length, stride, count


class _Geometry:
    def __init__(self, runs, lo, hi):
        self.runs, self.lo, self.hi = runs, lo, hi


def test_run_groups_of_the_shard_spec_are_read_too():
    cut = runs_of(_Geometry((_RunGroup(10, 4), _RunGroup(0, 2, 5, 3)), 1, 9))
    assert torch.equal(torch.cat([p.positions() for p in cut]), torch.tensor([11, 12, 13, 0, 1, 5, 6, 10]))
