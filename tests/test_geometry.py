"""Reshape rules on hand-worked examples, and range statistics that add up across shards."""

import math

import pytest
import torch

from dist_memopt.shard.geometry import RangeGeometry, balanced_split, square_matricize


@pytest.mark.parametrize(
    "numel, expected",
    [
        (1, (1, 1)),
        (2, (2, 1)),
        (12, (4, 3)),  # isqrt 3 divides 12
        (16, (4, 4)),
        (18, (6, 3)),  # isqrt 4 does not divide, 3 does
        (13, (13, 1)),  # prime
        (31, (31, 1)),
        (162, (18, 9)),  # conv kernel 6x3x3x3: isqrt 12, largest divisor <= 12 is 9
        (30522 * 768, (5087, 4608)),  # the SMMF paper's BERT embedding example (Section 5.2)
    ],
)
def test_square_matricize(numel, expected):
    assert square_matricize(numel) == expected


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((), (1, 1)),  # scalar: square matricization of 1
        ((10,), (5, 2)),  # vector: square matricization
        ((31,), (31, 1)),
        ((23, 54), (23, 54)),  # matrices keep their shape
        ((2, 3, 4), (6, 4)),  # |2-12|=10, |6-4|=2
        ((6, 3, 3, 3), (18, 9)),  # |6-27|=21, |18-9|=9, |54-3|=51
        ((3, 4, 3), (3, 12)),  # tie |3-12| = |12-3|: the first split wins
        ((8, 1, 1), (8, 1)),  # |8-1|=7 ties |8-1|=7: first split
    ],
)
def test_balanced_split(shape, expected):
    assert balanced_split(shape) == expected


def test_matricize_rejects_empty():
    with pytest.raises(ValueError, match="positive"):
        square_matricize(0)


def _partitions(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges as torch.chunk would cut them, empty ranges included."""
    size = math.ceil(numel / parts)
    return [(min(r * size, numel), min((r + 1) * size, numel)) for r in range(parts)]


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 1), (1, 9), (5, 4), (23, 6), (13, 17)])
@pytest.mark.parametrize("parts", [1, 2, 3, 5, 40])
def test_partial_statistics_add_up(rows, cols, parts):
    torch.manual_seed(rows * 100 + cols)
    x = torch.rand(rows, cols, dtype=torch.float64)
    p = torch.rand(rows, dtype=torch.float64)
    q = torch.rand(cols, dtype=torch.float64)
    flat = x.reshape(-1)
    row_sum = torch.zeros(rows, dtype=torch.float64)
    col_sum = torch.zeros(cols, dtype=torch.float64)
    weighted_rows = torch.zeros(rows, dtype=torch.float64)
    weighted_cols = torch.zeros(cols, dtype=torch.float64)
    pieces = []
    for start, end in _partitions(rows * cols, parts):
        geo = RangeGeometry(rows, cols, start, end)
        geo.add_row_col_sums(flat[start:end], row_sum, col_sum)
        geo.add_weighted_row_sums(flat[start:end], q, weighted_rows)
        geo.add_weighted_col_sums(flat[start:end], p, weighted_cols)
        pieces.append(geo.outer(p, q, row_shift=-p / 2))
    torch.testing.assert_close(row_sum, x.sum(1))
    torch.testing.assert_close(col_sum, x.sum(0))
    torch.testing.assert_close(weighted_rows, x @ q)
    torch.testing.assert_close(weighted_cols, p @ x)
    torch.testing.assert_close(torch.cat(pieces), (torch.outer(p, q) - p.unsqueeze(1) / 2).reshape(-1))


def test_range_decomposition_hand_worked():
    # a 4x5 matrix, range [3, 14): 2 elements ending row 0, rows 1-1 full (5), 4 starting row 2
    geo = RangeGeometry(4, 5, 3, 14)
    assert (geo.row0, geo.col0, geo.head, geo.body_rows, geo.tail, geo.touched_rows) == (0, 3, 2, 1, 4, 3)
    inside_one_row = RangeGeometry(4, 5, 6, 8)
    assert (inside_one_row.head, inside_one_row.body_rows, inside_one_row.tail) == (2, 0, 0)
    assert geo.sub(2, 7) == RangeGeometry(4, 5, 5, 10)
    empty = RangeGeometry(4, 5, 20, 20)
    assert empty.touched_rows == 0 and empty.outer(torch.ones(4), torch.ones(5)).numel() == 0
    with pytest.raises(ValueError, match="does not fit"):
        RangeGeometry(4, 5, 3, 21)
