"""The fused Triton kernels of SMMF and Alada, run on CPU through Triton's interpreter.

A second implementation of the same equations: held to the float64 references over 20 steps on
the fidelity model, to the torch path on sharded layouts (partial first and last rows, empty
shards, several segments in one tensor whose SMMF sign bytes share 32-bit words), on strided
tensor-parallel pieces (column blocks of a matrix, a segment of two pieces sharing rows) against
the unsharded torch step, with bf16 parameters, both SMMF decay modes, ``beta=None`` and Alada's
momentum in ``.grad``; and run twice, bit-identical. Small shapes: the interpreter runs each
program in numpy. ``TRITON_INTERPRET=1`` comes from tests/conftest.py.
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
from kernel_cases import ALADA_STRIDED_CASES, STRIDED_CASES, momentum_in_grad_run, sharded_run, strided_rank
from models import AwkwardModel, loss_fn
from reference import AladaReference, SMMFReference

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it unless the environment says otherwise
    pytest.skip("TRITON_INTERPRET is not 1 in this environment", allow_module_level=True)

TOLERANCE = 5e-6  # as in test_fidelity.py
CONFIGS = {
    "smmf-adamw-decay": (dm.SMMF, SMMFReference, dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adamw")),
    "smmf-adam-decay": (dm.SMMF, SMMFReference, dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adam")),
    "smmf-no-first-moment": (dm.SMMF, SMMFReference, dict(lr=1e-2, beta=None)),
    "alada": (dm.Alada, AladaReference, dict(lr=1e-2)),
    "alada-decay-betas": (dm.Alada, AladaReference, dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-12)),
}


@pytest.mark.parametrize("cls, reference, config", CONFIGS.values(), ids=CONFIGS.keys())
def test_triton_matches_the_float64_reference(cls, reference, config):
    model = AwkwardModel()
    optimizer = cls(model.parameters(), kernel="triton", **config)
    references = [reference(p, **config) for p in model.parameters()]
    for step in range(20):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        for ref, grad, param in zip(references, grads, model.parameters()):
            ref.step(grad)
            scale = max(1.0, ref.w.abs().max().item())
            assert (param.detach().double() - ref.w).abs().max().item() <= TOLERANCE * scale, f"step {step + 1}"


SHARDED = {
    "smmf": (dm.SMMF, dict(weight_decay=0.1)),
    "smmf-adam-no-first-moment": (dm.SMMF, dict(beta=None, weight_decay=0.1, weight_decay_mode="adam")),
    "alada": (dm.Alada, dict(weight_decay=0.1)),
}


@pytest.mark.parametrize("cls, config", SHARDED.values(), ids=SHARDED.keys())
def test_triton_matches_the_torch_path_on_sharded_layouts(cls, config):
    fused, fused_opt = sharded_run("triton", config, cls=cls)
    plain, plain_opt = sharded_run("torch", config, cls=cls)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for key, value in plain_opt.state[b].items():
            got = fused_opt.state[a][key]
            if key == "sign":  # a sign can only differ where M is within rounding of 0
                assert (got ^ value).count_nonzero().item() <= 1
            else:
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [dict(weight_decay=0.1), dict(weight_decay=0.1, weight_decay_mode="adam"), dict(beta=None)], ids=["adamw", "adam", "no-m"])
def test_smmf_loads_and_stores_half_precision_weights_like_the_torch_path(dtype, config):
    """The kernels read bf16/fp16 weights and gradients themselves and round the updated weight
    to nearest even, as the torch path's fp32 copy does when written back: bit for bit."""
    fused, _ = sharded_run("triton", config, dtype, steps=4)
    plain, _ = sharded_run("torch", config, dtype, steps=4)
    for a, b in zip(fused, plain):
        assert a.dtype == dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_half_precision_step_makes_no_fp32_copies(cls):
    """Counted: a bf16 parameter's step moves its own 2-byte weight and gradient, no fp32 copy of
    either: the same launches as for fp32, and 2 bytes less per element for each of the weight's
    read, the gradient's read and the weight's write."""
    from dist_memopt.bench.counting import StepCost

    def counted(dtype: torch.dtype) -> StepCost:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 48).to(dtype)), torch.nn.Parameter(torch.randn(48, 64).to(dtype))]
        optimizer = cls(params, kernel="triton", check_finite=False)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()  # state allocated
        with StepCost(optimizer, execute=False) as cost:  # the interpreter's own host copies not counted
            optimizer.step()
        return cost

    half, full = counted(torch.bfloat16), counted(torch.float32)
    assert half.ops == full.ops and "_to_copy" not in half.ops and "copy_" not in half.ops, half.ops
    numel = 2 * 64 * 48
    assert full.bytes_read - half.bytes_read == 4 * numel
    assert full.bytes_written - half.bytes_written == 2 * numel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_alada_half_precision_parameters_step_like_the_torch_path(dtype):
    fused, _ = sharded_run("triton", {}, dtype, steps=3, cls=dm.Alada)
    plain, _ = sharded_run("torch", {}, dtype, steps=3, cls=dm.Alada)
    for a, b in zip(fused, plain):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # within one rounding (sums may differ in their last bit)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_two_runs_are_bit_identical(cls):
    first, first_opt = sharded_run("triton", dict(weight_decay=0.1), steps=3, cls=cls)
    second, second_opt = sharded_run("triton", dict(weight_decay=0.1), steps=3, cls=cls)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
        assert all(torch.equal(first_opt.state[a][k], second_opt.state[b][k]) for k in first_opt.state[a])


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


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_alada_momentum_in_grad_matches_the_torch_path(dtype, atol):
    """M in .grad, bf16 included (the kernels read it there in its own dtype)."""
    for a, b in zip(momentum_in_grad_run("triton", dtype), momentum_in_grad_run("torch", dtype)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


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
