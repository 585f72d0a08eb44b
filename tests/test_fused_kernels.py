"""Both fused kernel families — the C++ CPU kernels and the Triton kernels (through Triton's
interpreter on CPU) — held to the same checks: the float64 references over 20 steps on the
fidelity model; the torch path on sharded layouts (partial first and last rows, an empty shard,
several segments in one tensor sharing sign bytes, strided tensor-parallel pieces); bf16 and fp16
parameters read and written in their own dtype, bit for bit like the torch path's fp32 copy
written back; Alada's momentum in ``.grad``; two runs bit-identical. Small shapes: the interpreter
runs each Triton program in numpy."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import dist_memopt as dm
from dist_memopt.bench.counting import StepCost
from dist_memopt.kernels.jobs import StatSlots
from kernel_cases import ALADA_STRIDED_CASES, STRIDED_CASES, KernelNames, alada_strided_rank, momentum_in_grad_run, sharded_run, strided_rank
from models import AwkwardModel, loss_fn
from reference import AladaReference, SMMFReference

_INTERPRETED = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
FAMILIES = pytest.mark.parametrize(
    "family", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(not _INTERPRETED, reason="needs triton and TRITON_INTERPRET=1"))]
)

TOLERANCE = 5e-6  # as in test_fidelity.py
CONFIGS = {
    "smmf-adamw-decay": (dm.SMMF, SMMFReference, dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adamw")),
    "smmf-adam-decay": (dm.SMMF, SMMFReference, dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adam")),
    "smmf-no-first-moment": (dm.SMMF, SMMFReference, dict(lr=1e-2, beta=None)),
    "alada": (dm.Alada, AladaReference, dict(lr=1e-2)),
    "alada-decay-betas": (dm.Alada, AladaReference, dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-12)),
}


@FAMILIES
@pytest.mark.parametrize("cls, reference, config", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_kernels_match_the_float64_reference(family, cls, reference, config):
    model = AwkwardModel()
    optimizer = cls(model.parameters(), kernel=family, **config)
    optimizer.kernel_observer = launched = KernelNames()
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
    assert launched.names and all(name.startswith(f"{family}.") for name in launched.names), launched.names


SHARDED = {
    "smmf": (dm.SMMF, dict(weight_decay=0.1)),
    "smmf-adam-no-first-moment": (dm.SMMF, dict(beta=None, weight_decay=0.1, weight_decay_mode="adam")),
    "alada": (dm.Alada, dict(weight_decay=0.1)),
}


@FAMILIES
@pytest.mark.parametrize("cls, config", SHARDED.values(), ids=SHARDED.keys())
def test_the_kernels_match_the_torch_path_on_sharded_layouts(family, cls, config):
    fused, fused_opt = sharded_run(family, config, cls=cls)
    plain, plain_opt = sharded_run("torch", config, cls=cls)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for key, value in plain_opt.state[b].items():
            got = fused_opt.state[a][key]
            if key == "sign":  # a sign can only differ where M is within rounding of 0
                assert (got ^ value).count_nonzero().item() <= 1
            else:
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7)


@FAMILIES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [dict(weight_decay=0.1), dict(weight_decay=0.1, weight_decay_mode="adam"), dict(beta=None)],
                         ids=["adamw", "adam", "no-m"])
def test_smmf_loads_and_stores_half_precision_weights_like_the_torch_path(family, dtype, config):
    """The kernels read bf16/fp16 weights and gradients themselves and round the updated weight
    to nearest even, as the torch path's fp32 copy does when written back. The factors are sums
    in another order, so an fp32 weight can differ in its last bits and, where it lies next to a
    rounding boundary, round to the neighbouring half-precision value: at most one unit in the
    last place, in under 1% of the elements (another rounding, e.g. truncation, moves about half)."""
    fused, _ = sharded_run(family, config, dtype, steps=4)
    plain, _ = sharded_run("torch", config, dtype, steps=4)
    differ = total = 0
    for a, b in zip(fused, plain):
        assert a.dtype == dtype
        exact = b.float().abs().clamp_min(torch.finfo(dtype).tiny)
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact)))
        assert bool(((a.float() - b.float()).abs() <= ulp).all())
        differ += int((a != b).sum())
        total += a.numel()
    assert differ <= 0.01 * total, (differ, total)


@FAMILIES
@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_half_precision_step_makes_no_fp32_copies(family, cls):
    """Counted: a bf16 parameter's step moves its own 2-byte weight and gradient, no fp32 copy of
    either: the same launches as for fp32, and 2 bytes less per element for each of the weight's
    read, the gradient's read and the weight's write."""

    def counted(dtype: torch.dtype) -> StepCost:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 48).to(dtype)), torch.nn.Parameter(torch.randn(48, 64).to(dtype))]
        optimizer = cls(params, kernel=family, check_finite=False)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()  # state allocated
        with StepCost(optimizer, execute=False) as cost:  # a dry run: the interpreter's own host copies not counted
            optimizer.step()
        return cost

    half, full = counted(torch.bfloat16), counted(torch.float32)
    assert half.ops == full.ops and "_to_copy" not in half.ops and "copy_" not in half.ops, half.ops
    numel = 2 * 64 * 48
    assert full.bytes_read - half.bytes_read == 4 * numel
    assert full.bytes_written - half.bytes_written == 2 * numel


@FAMILIES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_alada_half_precision_parameters_step_like_the_torch_path(family, dtype):
    fused, _ = sharded_run(family, {}, dtype, steps=3, cls=dm.Alada)
    plain, _ = sharded_run("torch", {}, dtype, steps=3, cls=dm.Alada)
    for a, b in zip(fused, plain):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # within one rounding (sums may differ in their last bit)


@FAMILIES
@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_two_runs_are_bit_identical(family, cls):
    first, first_opt = sharded_run(family, dict(weight_decay=0.1), steps=3, cls=cls)
    second, second_opt = sharded_run(family, dict(weight_decay=0.1), steps=3, cls=cls)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
        assert all(torch.equal(first_opt.state[a][k], second_opt.state[b][k]) for k in first_opt.state[a])


@FAMILIES
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_alada_momentum_in_grad_matches_the_torch_path(family, dtype, atol):
    """M in .grad, bf16 included (the kernels read it there in its own dtype)."""
    for a, b in zip(momentum_in_grad_run(family, dtype), momentum_in_grad_run("torch", dtype)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


#: per family: the SMMF and Alada runners, the names SMMF's step and finish report
RUNNERS = {
    "triton": ("dist_memopt.kernels.smmf_triton.FusedSMMF", "dist_memopt.kernels.alada_triton.FusedAlada", ("smmf_tiles", "smmf_finish")),
    "cpu": ("dist_memopt.kernels.smmf_cpu.CpuSMMF", "dist_memopt.kernels.alada_cpu.CpuAlada", ("smmf", "smmf_finish")),
}


def _runner(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _check_triton_index_math(family: str, case: str, ranks: list, m: int) -> None:
    """The Triton kernels' index math for these pieces: divided for narrow strides, else carried."""
    if family == "triton":
        from dist_memopt.kernels.tiles import DIVIDED, STRIDED, index_math, tiles_shape

        mode = DIVIDED if case == "narrow" else STRIDED
        assert all(index_math([rank[1].geometry], tiles_shape(m)[1])["RUNS"] == mode for rank in ranks)


@FAMILIES
@pytest.mark.parametrize("case", STRIDED_CASES)
def test_strided_pieces_summed_over_ranks_equal_the_unsharded_torch_step(family, case):
    """Pieces of a tensor on several 'ranks', as a flat shard of a TP block is; statistics summed as
    an all_reduce would: the unsharded torch step (in either Triton index math)."""
    from dist_memopt.optim.bits import unpack_signs
    from dist_memopt.optim.smmf import _Schedule

    runner = _runner(RUNNERS[family][0])
    n, m, pieces = STRIDED_CASES[case]
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(n * m))
    reference = dm.SMMF([full], kernel="torch", lr=1e-2, weight_decay=0.1)
    ranks = [strided_rank(full, runs, n, m, lo, hi) for runs, lo, hi in pieces]
    _check_triton_index_math(family, case, ranks, m)
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
                fused = runner(cost)
                fused.add(item, seg, hp, slots)
                fused.run()
                steps.append(fused)
            total = sum(rank[3] for rank in ranks)  # the all_reduce
            for (_, _, _, stats, _), fused in zip(ranks, steps):
                stats.copy_(total)
                fused.finish()
        assert [cost.ops[f"{family}.{name}"] for name in RUNNERS[family][2]] == [len(ranks)] * 2  # one launch each per rank
        expected = reference.state[full]
        signs = unpack_signs(expected["sign"], n * m)
        for item, _, positions, _, _ in ranks:
            torch.testing.assert_close(item.weight, full.detach()[positions], rtol=0, atol=1e-6)
            for key in ("row_v", "col_v", "row_m", "col_m"):
                torch.testing.assert_close(item.state[key], expected[key], rtol=1e-5, atol=1e-8)
            assert torch.equal(unpack_signs(item.state["sign"], positions.numel()), signs[positions])


@FAMILIES
@pytest.mark.parametrize("case", ALADA_STRIDED_CASES)
def test_alada_strided_pieces_summed_over_ranks_equal_the_unsharded_torch_step(family, case):
    """Alada's two passes on the same column blocks: statistics summed between them (the all_reduce)."""
    from dist_memopt.optim.alada import _Schedule

    runner = _runner(RUNNERS[family][1])
    n, m, cases = ALADA_STRIDED_CASES[case]
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(n, m))
    reference = dm.Alada([full], kernel="torch", lr=1e-2, weight_decay=0.1)
    ranks = [alada_strided_rank(full, pieces, n, m, lo, hi) for pieces, lo, hi in cases]
    _check_triton_index_math(family, case, ranks, m)
    generator = torch.Generator().manual_seed(1)
    for t in range(5):
        full.grad = torch.randn(n, m, generator=generator)
        reference.step()
        hp = _Schedule.at(reference.param_groups[0], t)
        steps = []
        for item, seg, positions, stats in ranks:
            item.grad.copy_(full.grad.view(-1)[positions])
            stats.zero_()
            fused = runner()
            fused.add(item, seg, hp, StatSlots(stats, {"row": n, "col": m, "norm": 1}))
            fused.statistics()
            steps.append(fused)
        total = sum(rank[3] for rank in ranks)  # the all_reduce
        for (_, _, _, stats), fused in zip(ranks, steps):
            stats.copy_(total)
            fused.update()
        expected = reference.state[full]
        # M: Triton's β1·M + (1 − β1)·G rounds as torch's lerp here; the CPU kernel's fma may differ in the last bit
        momentum_rtol = 0 if family == "triton" else 1e-6
        for item, _, positions, _ in ranks:
            torch.testing.assert_close(item.weight, full.detach().view(-1)[positions], rtol=0, atol=1e-6)
            torch.testing.assert_close(item.state["exp_avg"], expected["exp_avg"][positions], rtol=momentum_rtol, atol=1e-7)
            for key in ("row", "col", "v0"):
                torch.testing.assert_close(item.state[key], expected[key], rtol=1e-6, atol=1e-12)  # fp32 sums, another order
