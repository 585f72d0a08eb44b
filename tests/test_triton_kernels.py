"""What is particular to the fused Triton kernels, run on CPU through Triton's interpreter: the index
math a batch compiles (contiguous, strided by a carry, divided), and strided tensor-parallel pieces
(column blocks of a matrix, a segment of two pieces sharing rows) on several 'ranks' against the
unsharded torch step, in each index math. The checks both kernel families share are in
test_fused_kernels.py. ``TRITON_INTERPRET=1`` comes from tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import dist_memopt as dm
from dist_memopt import Segment, ShardSpec
from dist_memopt.shard.runs import RunsGeometry
from dist_memopt.shard.spec import Run
from kernel_cases import ALADA_STRIDED_CASES, STRIDED_CASES, strided_rank

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it unless the environment says otherwise
    pytest.skip("TRITON_INTERPRET is not 1 in this environment", allow_module_level=True)

def test_only_runs_of_several_pieces_compile_strided_index_math_and_only_narrow_strides_divide():
    """Strided index math for TP-style pieces only: a flat FSDP/ZeRO range and a run group of single
    pieces take the contiguous one; a stride narrower than a column block (a piece's columns may
    then wrap several times in one block) takes the per-element 64-bit division."""
    from dist_memopt.shard.geometry import RangeGeometry
    from dist_memopt.kernels.tiles import CONTIGUOUS, DIVIDED, STRIDED, index_math

    assert index_math([RangeGeometry(10, 6, 7, 43)], 16) == {"RUNS": CONTIGUOUS}
    assert index_math([RunsGeometry(10, 6, (Run(4, 30),), 0, 30)], 16) == {"RUNS": CONTIGUOUS}
    wide = RunsGeometry(10, 40, (Run(8, 16, 40, 10),), 0, 160)
    assert index_math([RangeGeometry(10, 40, 0, 400), wide], 32) == {"RUNS": STRIDED}  # one strided segment: the batch's math
    assert index_math([wide], 41) == {"RUNS": DIVIDED}
    narrow = RunsGeometry(10, 6, (Run(0, 2, 6, 10),), 0, 20)
    assert index_math([wide, narrow], 16) == {"RUNS": DIVIDED}


@pytest.mark.parametrize("case", STRIDED_CASES)
def test_strided_pieces_summed_over_ranks_equal_the_unsharded_torch_step(case):
    """Pieces of a tensor on several 'ranks', as a flat shard of a TP block is; statistics summed as
    an all_reduce would: the unsharded torch step, in either strided index math."""
    from dist_memopt.bench.counting import StepCost
    from dist_memopt.kernels.smmf_triton import FusedSMMF
    from dist_memopt.kernels.tiles import DIVIDED, STRIDED, index_math, tiles_shape
    from dist_memopt.optim.bits import unpack_signs
    from dist_memopt.optim.smmf import _Schedule

    n, m, pieces = STRIDED_CASES[case]
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(n * m))
    reference = dm.SMMF([full], kernel="torch", lr=1e-2, weight_decay=0.1)
    ranks = [strided_rank(full, runs, n, m, lo, hi) for runs, lo, hi in pieces]
    mode = DIVIDED if case == "narrow" else STRIDED
    assert all(index_math([seg.geometry], tiles_shape(m)[1])["RUNS"] == mode for _, seg, _, _, _ in ranks)
    generator = torch.Generator().manual_seed(1)
    for t in range(1, 6):
        full.grad = torch.randn(n * m, generator=generator)
        reference.step()
        hp = _Schedule.at(reference.param_groups[0], t)
        steps = []
        with StepCost() as cost:
            for item, seg, positions, stats, slots in ranks:
                item.grad.copy_(full.grad[positions])
                stats.zero_()
                fused = FusedSMMF(cost)
                fused.add(item, seg, hp, slots)
                fused.run()
                steps.append(fused)
            total = sum(rank[3] for rank in ranks)  # the all_reduce
            for (_, _, _, stats, _), fused in zip(ranks, steps):
                stats.copy_(total)
                fused.finish()
        assert cost.ops["triton.smmf_tiles"] == len(ranks) and cost.ops["triton.smmf_finish"] == len(ranks)
        expected = reference.state[full]
        signs = unpack_signs(expected["sign"], n * m)
        for item, _, positions, _, _ in ranks:
            torch.testing.assert_close(item.weight, full.detach()[positions], rtol=0, atol=1e-6)
            for key in ("row_v", "col_v", "row_m", "col_m"):
                torch.testing.assert_close(item.state[key], expected[key], rtol=1e-5, atol=1e-8)
            assert torch.equal(unpack_signs(item.state["sign"], positions.numel()), signs[positions])


@pytest.mark.parametrize("case", ALADA_STRIDED_CASES)
def test_alada_strided_pieces_summed_over_ranks_equal_the_unsharded_torch_step(case):
    """Alada's two passes on the same column blocks: statistics summed between them (the all_reduce)."""
    from types import SimpleNamespace

    from dist_memopt.kernels.alada_triton import FusedAlada
    from dist_memopt.kernels.tiles import DIVIDED, STRIDED, index_math, tiles_shape
    from dist_memopt.optim.alada import _Schedule
    from dist_memopt.optim.base import SegmentPlan

    n, m, cases = ALADA_STRIDED_CASES[case]
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(n, m))
    reference = dm.Alada([full], kernel="torch", lr=1e-2, weight_decay=0.1)
    ranks = []
    for pieces, lo, hi in cases:
        positions = torch.cat([p.positions() for p in pieces])
        hi = positions.numel() if hi < 0 else hi
        positions = positions[lo:hi]
        f64 = dict(dtype=torch.float64)
        state = dict(exp_avg=torch.zeros(positions.numel()), row=torch.zeros(n, **f64), col=torch.zeros(m, **f64), v0=torch.zeros(1, **f64))
        seg = SegmentPlan(Segment(0, ShardSpec((n * m,), 0, positions.numel())), RunsGeometry(n, m, pieces, lo, hi))
        assert index_math([seg.geometry], tiles_shape(m)[1])["RUNS"] == (DIVIDED if case == "narrow" else STRIDED)
        item = SimpleNamespace(weight=full.detach().view(-1)[positions].clone(), grad=torch.zeros(positions.numel()), state=state)
        ranks.append((item, seg, positions, torch.zeros(n + m + 1)))
    generator = torch.Generator().manual_seed(1)
    for t in range(5):
        full.grad = torch.randn(n, m, generator=generator)
        reference.step()
        hp = _Schedule.at(reference.param_groups[0], t)
        steps = []
        for item, seg, positions, stats in ranks:
            item.grad.copy_(full.grad.view(-1)[positions])
            stats.zero_()
            fused = FusedAlada()
            fused.add(item, seg, hp, stats[n : n + m] if t % 2 else stats[:n], stats[n + m :])
            fused.statistics()
            steps.append(fused)
        total = sum(rank[3] for rank in ranks)  # the all_reduce
        for (_, _, _, stats), fused in zip(ranks, steps):
            stats.copy_(total)
            fused.update()
        expected = reference.state[full]
        for item, _, positions, _ in ranks:
            torch.testing.assert_close(item.weight, full.detach().view(-1)[positions], rtol=0, atol=1e-6)
            torch.testing.assert_close(item.state["exp_avg"], expected["exp_avg"][positions], rtol=0, atol=1e-7)
            for key in ("row", "col", "v0"):
                torch.testing.assert_close(item.state[key], expected[key], rtol=1e-6, atol=1e-12)  # fp32 sums, another order
