"""What is particular to the fused CPU kernels (C++, built on first use): ``kernel="auto"`` takes
them on CPU tensors; another thread count gives bit-identical results; a failed build warns under
``"auto"`` and raises under ``"cpu"``. The checks both kernel families share (float64 references,
sharded and strided layouts, bf16/fp16, reruns) are in test_fused_kernels.py."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dist_memopt as dm
from dist_memopt import Segment, ShardSpec, set_layout
from dist_memopt.kernels import cpu_build, select
from dist_memopt.kernels.cpu_build import cpu_kernels_problem
from kernel_cases import KernelNames
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
    paired = torch.nn.Parameter(torch.randn(1091, 1088, generator=torch.Generator().manual_seed(4)))  # tiles of row pairs
    opt = cls([big, paired], kernel="cpu")
    for _ in range(3):
        big.grad = torch.randn(big.shape, generator=torch.Generator().manual_seed(3))
        paired.grad = torch.randn(paired.shape, generator=torch.Generator().manual_seed(5))
        opt.step()
    state = opt.state_dict()["state"]
    out[name] = [p.detach().clone() for p in params] + [big.detach().clone(), paired.detach().clone()]
    out[name] += [v for s in state.values() for v in s.values()]
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


def _scalar_build():
    """The kernels built with DMO_FORCE_SCALAR (cached like the real build, under its own name)."""
    return cpu_build._compile(cpu_build._build_name() + "_scalar", cpu_build.FLAGS + ["-DDMO_FORCE_SCALAR"])


def test_the_scalar_code_steps_as_the_vector_code_does(monkeypatch):
    """Processors without AVX2 (aarch64, older x86) take the scalar code: built here with
    DMO_FORCE_SCALAR, SMMF and Alada step the sharded layouts and views whose rows the vector
    code steps in pairs to the vector build's numbers (the partial sums add in another order, so
    to within rounding), and its finite scan finds what the vector one finds."""
    from dist_memopt.kernels import alada_cpu, smmf_cpu
    from kernel_cases import sharded_run

    scalar = _scalar_build()
    assert scalar.simd() == "scalar" and cpu_build.cpu_kernels().simd() != "scalar"

    def run(module):
        with monkeypatch.context() as patch:
            for owner in (cpu_build, smmf_cpu, alada_cpu):
                patch.setattr(owner, "cpu_kernels", lambda: module)
            out = []
            for cls in (dm.SMMF, dm.Alada):
                params, optimizer = sharded_run("cpu", dict(weight_decay=0.1), steps=4, cls=cls)
                wide = torch.nn.Parameter(torch.randn(201, 200, generator=torch.Generator().manual_seed(2)))
                opt = cls([wide], kernel="cpu")
                for step in range(4):
                    wide.grad = torch.randn(wide.shape, generator=torch.Generator().manual_seed(3 + step))
                    opt.step()
                states = [*optimizer.state_dict()["state"].values(), *opt.state_dict()["state"].values()]
                out += [p.detach().clone() for p in params] + [wide.detach().clone()] + [v for s in states for v in s.values()]
            return out

    for vector, plain in zip(run(cpu_build.cpu_kernels()), run(scalar)):
        if vector.dtype == torch.uint8:  # SMMF's signs: a flip only where M rounds to about 0
            assert (vector != plain).sum().item() <= vector.numel() // 1000
        else:
            torch.testing.assert_close(plain, vector, rtol=1e-5, atol=1e-6)
    bad = [torch.randn(100), torch.randn(1 << 20)]
    bad[1][777_777] = float("nan")
    assert scalar.first_nonfinite(bad) == cpu_build.cpu_kernels().first_nonfinite(bad) == 1


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_scan_finds_every_inf_and_nan_wherever_it_lies(dtype):
    """The scan reads each 1M-element piece as interleaved streams with a scalar tail: a bad
    element at any position (piece, stream and tail boundaries) is found in the right tensor."""
    scan = cpu_build.cpu_kernels().first_nonfinite
    piece = 1 << 20
    generator = torch.Generator().manual_seed(0)
    for numel in (1, 15, 64, 65, 1000, piece + 77, 2 * piece + 5):
        quarter = numel // 64 * 16
        positions = {0, numel - 1, quarter - 1, quarter, 3 * quarter, 4 * quarter - 1, 4 * quarter, piece - 1, piece,
                     int(torch.randint(numel, (), generator=generator))}
        for position in sorted(p for p in positions if 0 <= p < numel):
            for value in (float("inf"), float("-inf"), float("nan")):
                tensors = [torch.randn(numel, generator=generator).to(dtype) for _ in range(3)]
                assert scan(tensors) == -1
                tensors[1][position] = value
                assert scan(tensors) == 1, (numel, position, value)
    assert scan([torch.full((40,), 6e4, dtype=dtype).clamp(max=torch.finfo(dtype).max)]) == -1  # large is finite


def test_the_scan_during_the_bookkeeping_finds_what_the_scan_finds_and_returns_or_raises_what_it_did():
    """first_nonfinite_during: the calling thread runs Python while the others scan, then helps;
    every piece is read whoever reads it, and the Python's result or exception comes back."""
    kernels = cpu_build.cpu_kernels()
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(numel, generator=generator) for numel in (5, (1 << 20) * 3 + 7, 1000, 1 << 21)]
    calls = []
    assert kernels.first_nonfinite_during(tensors, lambda: calls.append(1) or "planned") == (-1, "planned")
    for index, position in ((0, 4), (1, (1 << 20) * 3 + 6), (3, 1 << 20)):
        bad = [t.clone() for t in tensors]
        bad[index][position] = float("nan")
        assert kernels.first_nonfinite_during(bad, lambda: None)[0] == kernels.first_nonfinite(bad) == index
    assert calls == [1]

    def fails():
        raise KeyError("from the bookkeeping")

    with pytest.raises(KeyError, match="from the bookkeeping"):
        kernels.first_nonfinite_during(tensors, fails)


def test_step_counters_advance_in_the_module_as_foreach_add_does():
    """The module adds to float32 step counters what torch._foreach_add_ adds, bumping each
    version once (StepCounts reads a counter changed by anyone else by its version), and refuses,
    changing nothing, a list holding any other kind of counter."""
    advance = cpu_build.cpu_kernels().advance_steps
    steps = [torch.tensor(float(i)) for i in range(5)] + [torch.zeros(3)[1]]  # a view into a larger storage too
    expected = [s.clone() for s in steps]
    versions = [s._version for s in steps]
    assert advance(steps, 1.0)
    torch._foreach_add_(expected, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(steps, expected))
    assert [s._version for s in steps] == [v + 1 for v in versions]
    for other in (torch.tensor(2.0, dtype=torch.float64), torch.zeros(2), torch.tensor(1.0, requires_grad=True)):
        mixed = [torch.tensor(1.0), other]
        before = [t.detach().clone() for t in mixed]
        assert not advance(mixed, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(mixed, before))


def test_a_step_on_the_cpu_kernels_advances_its_counters_without_a_foreach_op():
    """No dispatched op for the counters (a foreach op on CPU costs about 3 us per tensor); a
    counter the module cannot take (here float64, put there by hand) moves them all through
    torch._foreach_add_ instead, to the same counts."""
    from dist_memopt.bench.counting import StepCost

    model = AwkwardModel()
    optimizer = dm.SMMF(model.parameters(), check_finite=False)
    for step in range(2):
        loss_fn(model, step).backward()
        with StepCost() as cost:
            optimizer.step()
    assert "_foreach_add_" not in cost.ops, cost.ops
    first = next(iter(optimizer.state.values()))
    first["step"] = first["step"].to(torch.float64)
    with StepCost() as cost:
        optimizer.step()
    assert cost.ops.get("_foreach_add_") == 1
    assert [s["step"].item() for s in optimizer.state.values()] == [3.0] * len(optimizer.state)
    assert first["step"].dtype == torch.float64


WIDE_CONFIGS = {
    "adamw-decay": dict(lr=1e-2, weight_decay=0.1),
    "adam-decay": dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adam"),
    "no-first-moment": dict(lr=1e-2, beta=None),
}


@pytest.mark.parametrize("config", WIDE_CONFIGS.values(), ids=WIDE_CONFIGS.keys())
def test_rows_of_whole_blocks_match_the_float64_reference(config):
    """Views a multiple of 16 wide: every element in a whole block, no head or tail (the model of
    the other tests has none such): the float64 reference. Views a multiple of 64 wide step whole
    rows in pairs (strips of wider views: test_fused_kernels.py's sharded layouts), and with AVX2
    alone so do views a multiple of 8 wide, whose rows end in a shorter sign word: (110, 96) and
    (201, 200), an odd row left to the row-by-row code."""
    from reference import SMMFReference

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(131, 64)), torch.nn.Parameter(torch.randn(96, 64) * 0.1),
              torch.nn.Parameter(torch.randn(110, 96)), torch.nn.Parameter(torch.randn(201, 200) * 0.1)]
    optimizer = dm.SMMF(params, kernel="cpu", **config)
    references = [SMMFReference(p, **config) for p in params]
    generator = torch.Generator().manual_seed(1)
    for step in range(10):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        for ref, grad, param in zip(references, grads, params):
            ref.step(grad)
            scale = max(1.0, ref.w.abs().max().item())
            assert (param.detach().double() - ref.w.view(param.shape)).abs().max().item() <= 5e-6 * scale, f"step {step + 1}"


def _alada_steps(params, layouts, config, steps, monkeypatch, reduced: bool) -> tuple[list[torch.Tensor], list[set[str]]]:
    """Alada's fused CPU steps on copies of ``params``; ``reduced`` routes every segment through
    the statistics, refit and update passes a sharded step takes (statistics completed by the
    all_reduce) instead of the one-pass even steps of segments of whole rows."""
    from dist_memopt.kernels import alada_cpu
    from dist_memopt.kernels.jobs import AladaJob

    with monkeypatch.context() as patch:
        if reduced:
            patch.setattr(alada_cpu.CpuAlada, "add", lambda self, item, seg, hp, slots: self._jobs.append(AladaJob(item, seg, hp, slots)))
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for index, layout in layouts.items():
            set_layout(copies[index], layout)
        optimizer = dm.Alada(copies, kernel="cpu", **config)
        names = []
        for step in range(steps):
            generator = torch.Generator().manual_seed(step)
            if config.get("momentum_in_grad"):
                optimizer.zero_grad()
                for p in copies:
                    p.grad.add_(torch.randn(p.shape, generator=generator).to(p.dtype), alpha=0.1)
            else:
                for p in copies:
                    p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            names.append(_counted_step(optimizer))
        state = optimizer.state_dict()["state"]
        return [p.detach() for p in copies] + [v for s in state.values() for v in s.values()], names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(weight_decay=0.1), dict(momentum_in_grad=True)], ids=["state-momentum", "momentum-in-grad"])
def test_alada_one_pass_even_steps_give_the_numbers_of_the_two_passes(config, dtype, monkeypatch):
    """At even t, segments of one run take one pass over the rows they hold whole, a row's update
    beside the next row's statistics where both are whole (the rows a range cuts: statistics, then
    refit and update after the all_reduce): the same operations in the same order as the two
    passes, so bit-identical weights and state. Widths 77, 96 and 33 end in a part chunk, a part
    block and single elements."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 77), (64, 64), (7,), (5, 3, 3, 3), (1031,), (128, 96), (), (6, 33), (6, 33), (17,), (193,), (40,)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]
    # ranges of a (40, 33) matrix: rows 10-15, as FSDP2 cuts it (the other rows' p refit from
    # zeros); a range cut mid-row at both ends, as ZeRO cuts it; one inside a row; one cut at its
    # start only; and a flat partition holding pieces of three tensors
    layouts = {7: [Segment(0, ShardSpec((40, 33), 10 * 33, 16 * 33))],
               8: [Segment(0, ShardSpec((40, 33), 10 * 33 + 5, 16 * 33 + 5))],
               9: [Segment(0, ShardSpec((40, 33), 10 * 33 + 3, 10 * 33 + 20))],
               10: [Segment(0, ShardSpec((40, 33), 10 * 33 + 5, 16 * 33))],
               11: [Segment(0, ShardSpec((3, 3), 2, 7)), Segment(5, ShardSpec((17,), 0, 13)), Segment(18, ShardSpec((6, 8), 3, 25))]}
    whole, names = _alada_steps(params, layouts, config, 5, monkeypatch, reduced=False)
    passes, reduced_names = _alada_steps(params, layouts, config, 5, monkeypatch, reduced=True)
    kernels = [n - {"cpu.finite_check"} for n in names]
    assert kernels[1] == {"cpu.alada_stats", "cpu.alada_update"}, names  # t = 1
    assert kernels[2] == {"cpu.alada_even_rows", "cpu.alada_refit_rest", "cpu.alada_update_cut_rows"}, names  # t = 2
    assert all(n >= {"cpu.alada_stats", "cpu.alada_update"} for n in reduced_names), reduced_names
    for a, b in zip(whole, passes, strict=True):
        assert torch.equal(a, b)
