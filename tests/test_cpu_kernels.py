"""What is particular to the fused CPU kernels (C++, built on first use): ``kernel="auto"`` takes
them on CPU tensors; another thread count gives bit-identical results; strided tensor-parallel
pieces on several 'ranks', statistics summed between the passes, equal the unsharded torch step;
a failed build warns under ``"auto"`` and raises under ``"cpu"``. The checks both kernel families
share (float64 references, sharded layouts, bf16/fp16, reruns) are in test_fused_kernels.py."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dist_memopt as dm
from dist_memopt.kernels import cpu_build, select
from dist_memopt.kernels.cpu_build import cpu_kernels_problem
from dist_memopt.shard.runs import RunsGeometry
from kernel_cases import ALADA_STRIDED_CASES, STRIDED_CASES, KernelNames, strided_rank
from models import AwkwardModel, loss_fn

if cpu_kernels_problem() is not None:  # the suite's machines have a compiler: this is the build failing
    pytest.fail(f"the fused CPU kernels do not build here: {cpu_kernels_problem()}", pytrace=False)

def _counted_step(optimizer) -> set[str]:
    """One step, returning the names of the fused kernels it ran."""
    optimizer.kernel_observer = observer = KernelNames()
    try:
        optimizer.step()
    finally:
        optimizer.kernel_observer = None
    return observer.names


def test_auto_takes_the_cpu_kernels_on_cpu_tensors():
    model = AwkwardModel()
    for cls in (dm.SMMF, dm.Alada):
        optimizer = cls(model.parameters())
        loss_fn(model, 0).backward()
        assert any(name.startswith("cpu.") for name in _counted_step(optimizer))
        assert not _counted_step(cls(model.parameters(), kernel="torch"))


_THREADS_SCRIPT = """
import sys, torch
sys.path[:0] = {paths!r}
torch.set_num_threads({threads})
import dist_memopt as dm
from kernel_cases import sharded_run
out = {{}}
for name, cls in (("smmf", dm.SMMF), ("alada", dm.Alada)):
    params, optimizer = sharded_run("cpu", dict(weight_decay=0.1), steps=3, cls=cls)
    big = torch.nn.Parameter(torch.randn(300, 517, generator=torch.Generator().manual_seed(2)))
    opt = cls([big], kernel="cpu")
    for _ in range(3):
        big.grad = torch.randn(big.shape, generator=torch.Generator().manual_seed(3))
        opt.step()
    out[name] = [p.detach().clone() for p in params] + [big.detach().clone(), *opt.state_dict()["state"][0].values()]
torch.save(out, {path!r})
"""


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """Work is cut into tiles by the geometry alone and partial sums are combined in tile order:
    1 and 3 threads give bit-identical weights and state (each in its own process)."""
    tests = str(Path(__file__).parent)
    results = []
    for threads in (1, 3):
        path = tmp_path / f"{threads}.pt"
        script = _THREADS_SCRIPT.format(paths=[tests, str(Path(tests).parent)], threads=threads, path=str(path))
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
        results.append(torch.load(path))
    for name in ("smmf", "alada"):
        for a, b in zip(results[0][name], results[1][name]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("case", STRIDED_CASES)
def test_strided_pieces_summed_over_ranks_equal_the_unsharded_torch_step(case):
    from dist_memopt.kernels.smmf_cpu import CpuSMMF
    from dist_memopt.optim.bits import unpack_signs
    from dist_memopt.optim.smmf import _Schedule

    n, m, pieces = STRIDED_CASES[case]
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(n * m))
    reference = dm.SMMF([full], kernel="torch", lr=1e-2, weight_decay=0.1)
    ranks = [strided_rank(full, runs, n, m, lo, hi) for runs, lo, hi in pieces]
    generator = torch.Generator().manual_seed(1)
    for t in range(1, 6):
        full.grad = torch.randn(n * m, generator=generator)
        reference.step()
        hp = _Schedule.at(reference.param_groups[0], t)
        steps = []
        for item, seg, positions, stats, slots in ranks:
            item.name = "piece"
            item.grad.copy_(full.grad[positions])
            stats.zero_()
            fused = CpuSMMF()
            fused.add(item, seg, hp, slots)
            fused.run()
            steps.append(fused)
        total = sum(rank[3] for rank in ranks)  # the all_reduce
        for (_, _, _, stats, _), fused in zip(ranks, steps):
            stats.copy_(total)
            fused.finish()
        expected = reference.state[full]
        signs = unpack_signs(expected["sign"], n * m)
        for item, _, positions, _, _ in ranks:
            torch.testing.assert_close(item.weight, full.detach()[positions], rtol=0, atol=1e-6)
            for key in ("row_v", "col_v", "row_m", "col_m"):
                torch.testing.assert_close(item.state[key], expected[key], rtol=1e-5, atol=1e-8)
            assert torch.equal(unpack_signs(item.state["sign"], positions.numel()), signs[positions])


@pytest.mark.parametrize("case", ALADA_STRIDED_CASES)
def test_alada_strided_pieces_summed_over_ranks_equal_the_unsharded_torch_step(case):
    from dist_memopt import Segment, ShardSpec
    from dist_memopt.kernels.alada_cpu import CpuAlada
    from dist_memopt.optim.alada import _Schedule
    from dist_memopt.optim.base import SegmentPlan

    n, m, cases = ALADA_STRIDED_CASES[case]
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(n, m))
    reference = dm.Alada([full], kernel="torch", lr=1e-2, weight_decay=0.1)
    ranks = []
    for pieces, lo, hi in cases:
        positions = torch.cat([p.positions() for p in pieces])
        positions = positions[lo : positions.numel() if hi < 0 else hi]
        f64 = dict(dtype=torch.float64)
        state = dict(exp_avg=torch.zeros(positions.numel()), row=torch.zeros(n, **f64), col=torch.zeros(m, **f64), v0=torch.zeros(1, **f64))
        seg = SegmentPlan(Segment(0, ShardSpec((n * m,), 0, positions.numel())), RunsGeometry(n, m, pieces, lo, positions.numel() if hi < 0 else hi))
        item = SimpleNamespace(name="piece", weight=full.detach().view(-1)[positions].clone(), grad=torch.zeros(positions.numel()), state=state)
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
            fused = CpuAlada()
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
            torch.testing.assert_close(item.state["exp_avg"], expected["exp_avg"][positions], rtol=1e-6, atol=1e-7)
            for key in ("row", "col", "v0"):
                torch.testing.assert_close(item.state[key], expected[key], rtol=1e-6, atol=1e-12)


def test_a_failed_build_warns_and_takes_the_torch_path_under_auto_and_raises_when_asked(monkeypatch):
    reason = "the fused CPU kernels could not be built (FileNotFoundError: c++); they need a C++17 compiler"
    monkeypatch.setattr(cpu_build, "_load", lambda: (None, reason))
    select._warn_once.cache_clear()
    model = AwkwardModel()
    loss_fn(model, 0).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ran = _counted_step(dm.SMMF(model.parameters()))
    assert not ran
    assert [str(w.message) for w in caught if reason in str(w.message)], [str(w.message) for w in caught]
    with pytest.raises(RuntimeError, match="could not be built"):
        dm.SMMF(model.parameters(), kernel="cpu").step()
    select._warn_once.cache_clear()


def test_kernel_cpu_refuses_other_devices():
    with pytest.raises(RuntimeError, match="kernel='cpu' steps CPU tensors"):
        meta = torch.empty(3, device="meta")
        select.takes_kernel(dm.SMMF, {"kernel": "cpu"}, meta, meta)
