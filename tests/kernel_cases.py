"""Layouts and runs shared by the fused kernels' tests (Triton interpreted, C++ on CPU, CUDA).

Parameters laid out like shards without a process group, strided tensor-parallel pieces split over
'ranks' whose statistics are summed by hand (as the all_reduce would), and the in-gradient momentum
loop of Alada done by hand.
"""

from __future__ import annotations

import torch

import dist_memopt as dm
from dist_memopt import Segment, ShardSpec, set_layout
from dist_memopt.kernels.jobs import StatSlots
from dist_memopt.shard.runs import RunsGeometry
from dist_memopt.shard.spec import Run
from models import AwkwardModel


class KernelNames:
    """A kernel observer (:mod:`dist_memopt.kernels.launch`) collecting the names of the fused
    kernels an optimizer launches: which implementation stepped its tensors."""

    execute = True

    def __init__(self) -> None:
        self.names: set[str] = set()

    def record(self, name: str, bytes_read: int, bytes_written: int) -> None:
        self.names.add(name)


def sharded_run(kernel: str, config: dict, dtype: torch.dtype = torch.float32, steps: int = 6, cls=dm.SMMF, device: str = "cpu"):
    """Parameters laid out like shards (no process group: partial statistics stay local, the same
    for both implementations): FSDP-like ranges cutting rows, an empty shard, a flat tensor
    holding three segments back to back, tensor-parallel strided pieces: a column block of a
    (64, 96) weight, one cut mid-piece (the cut piece a run of its own), and columns of a (10, 6)
    tensor (strides under a column block), a range of a view 48 wide, one of whole rows, and ranges
    of views 64 and 1088 wide (whole rows stepped in pairs by the CPU kernel). Also the CUDA tier's
    (test_cuda_kernels.py)."""
    torch.manual_seed(0)

    def param(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(*shape).to(dtype).to(device))

    matrix = param(20, 7)  # a range of a (23, 54) view: rows cut at both ends
    set_layout(matrix, [Segment(0, ShardSpec((23, 54), 61, 61 + 140))])
    empty = param(0)
    set_layout(empty, [Segment(0, ShardSpec((9, 4), 36, 36))])
    flat = param(5 + 13 + 22)  # sign bytes of three segments in one word
    set_layout(flat, [Segment(0, ShardSpec((3, 3), 2, 7)), Segment(5, ShardSpec((17,), 0, 13)), Segment(18, ShardSpec((6, 8), 3, 25))])
    block = param(64 * 40)
    set_layout(block, [Segment(0, ShardSpec.of_runs((64, 96), [Run(8, 40, 96, 64)]))])
    cut = param(16 * 20 + 13)
    set_layout(cut, [Segment(0, ShardSpec.of_runs((40, 48), [Run(8, 20, 48, 16), Run(776, 13)]))])
    narrow = param(20)
    set_layout(narrow, [Segment(0, ShardSpec.of_runs((10, 6), [Run(2, 2, 6, 10)]))])
    wide = param(11 * 48)  # a range of a (40, 48) view: partial rows around whole rows of whole blocks
    set_layout(wide, [Segment(0, ShardSpec((40, 48), 152, 152 + 11 * 48))])
    rows = param(6, 33)  # rows 10-15 of a (40, 33) matrix: a range cut at row boundaries, as FSDP2 cuts it
    set_layout(rows, [Segment(0, ShardSpec((40, 33), 10 * 33, 16 * 33))])
    paired = param(13 * 64)  # a range of a (67, 64) view: whole rows stepped two at a time between partial rows
    set_layout(paired, [Segment(0, ShardSpec((67, 64), 40, 40 + 13 * 64))])
    long_rows = param(5 * 1088)  # a range of a (1091, 1088) view: row pairs of 17 groups of 64 columns, between partial rows
    set_layout(long_rows, [Segment(0, ShardSpec((1091, 1088), 10 * 1088 + 40, 15 * 1088 + 40))])
    params = [empty, matrix, flat, block, cut, narrow, wide, rows, paired, long_rows]  # the empty shard first: no kernel base may be it
    optimizer = cls(params, kernel=kernel, lr=1e-2, **config)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype).to(device)
        optimizer.step()
    return params, optimizer


def _strided_piece(full: torch.Tensor, pieces: tuple[Run, ...], n: int, m: int, lo: int, hi: int, state: dict):
    """(item, segment, positions) of one 'rank's window of ``pieces`` of ``full`` in the (n, m) view."""
    from types import SimpleNamespace

    from dist_memopt.optim.base import SegmentPlan

    positions = torch.cat([p.positions() for p in pieces])
    hi = positions.numel() if hi < 0 else hi
    positions = positions[lo:hi]
    numel = positions.numel()
    seg = SegmentPlan(Segment(0, ShardSpec((n * m,), 0, numel)), RunsGeometry(n, m, pieces, lo, hi))
    item = SimpleNamespace(name="piece", weight=full.detach().reshape(-1)[positions].clone(), grad=torch.zeros(numel), state=state)
    return item, seg, positions


def strided_rank(full: torch.Tensor, pieces: tuple[Run, ...], n: int, m: int, lo: int = 0, hi: int = -1):
    """An SMMF 'rank' holding a window of strided pieces: item, segment, positions, its statistics
    buffer and its four statistics in it."""
    state = {k: torch.zeros(n if k.startswith("row") else m) for k in ("row_v", "col_v", "row_m", "col_m")}
    item, seg, positions = _strided_piece(full, pieces, n, m, lo, hi, state)
    state["sign"] = torch.zeros((positions.numel() + 7) // 8, dtype=torch.uint8)
    stats = torch.zeros(2 * (n + m))
    return item, seg, positions, stats, StatSlots(stats, {"row_v": n, "col_v": m, "row_m": n, "col_m": m})


def alada_strided_rank(full: torch.Tensor, pieces: tuple[Run, ...], n: int, m: int, lo: int = 0, hi: int = -1):
    """An Alada 'rank' holding a window of strided pieces: item, segment, positions and its
    statistics buffer (rows, columns, ‖G0‖²)."""
    f64 = dict(dtype=torch.float64)
    state = dict(row=torch.zeros(n, **f64), col=torch.zeros(m, **f64), v0=torch.zeros(1, **f64))
    item, seg, positions = _strided_piece(full, pieces, n, m, lo, hi, state)
    state["exp_avg"] = torch.zeros(positions.numel())
    return item, seg, positions, torch.zeros(n + m + 1)


#: per case: SMMF's (n, m) view and each 'rank's pieces and window, covering the tensor once
STRIDED_CASES = {
    # column blocks of a (10, 6) tensor: one block, two windows of a pair of blocks (pieces sharing
    # every row) cut mid-run; strides of 6 under a 16-column block: the dividing index math
    "narrow": (10, 6, [((Run(0, 2, 6, 10),), 0, -1), ((Run(2, 2, 6, 10), Run(4, 2, 6, 10)), 0, 27),
                       ((Run(2, 2, 6, 10), Run(4, 2, 6, 10)), 27, 40)]),
    # column blocks of a (40, 48) tensor in SMMF's (48, 40) view, pieces crossing its rows; the
    # middle block in two windows cut mid-piece: carried from block to block (strided index math)
    "tp_columns": (48, 40, [((Run(0, 8, 48, 40),), 0, -1), ((Run(8, 20, 48, 40),), 0, 333),
                            ((Run(8, 20, 48, 40),), 333, 800), ((Run(28, 20, 48, 40),), 0, -1)]),
    # a (60, 32) tensor's halves: the stride is exactly one 32-column block (a carry every block)
    "stride_is_block": (48, 40, [((Run(0, 16, 32, 60),), 0, -1), ((Run(16, 16, 32, 60),), 0, 500),
                                 ((Run(16, 16, 32, 60),), 500, 960)]),
}


def momentum_in_grad_run(kernel: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Backward's accumulation into .grad done by hand (loss·(1 − β1) gives (1 − β1)·g)."""
    torch.manual_seed(0)
    params = [p for p in AwkwardModel().to(dtype).parameters()]
    optimizer = dm.Alada(params, kernel=kernel, lr=1e-2, betas=(0.8, 0.9), momentum_in_grad=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        optimizer.zero_grad()  # .grad ← β1·.grad (zeros at first)
        for p in params:
            p.grad.add_((0.2 * torch.randn(p.shape, generator=generator)).to(dtype))
        optimizer.step()
    return [p.detach() for p in params]


#: Alada keeps a matrix as it is: (n, m) and each 'rank's pieces and window
ALADA_STRIDED_CASES = {
    "narrow": (6, 10, [((Run(0, 4, 10, 6),), 0, -1), ((Run(4, 3, 10, 6), Run(7, 3, 10, 6)), 0, -1)]),  # dividing
    "tp_columns": (40, 48, [((Run(0, 20, 48, 40),), 0, -1), ((Run(20, 28, 48, 40),), 0, 517),
                            ((Run(20, 28, 48, 40),), 517, 1120)]),  # carried, a window cut mid-row
}


