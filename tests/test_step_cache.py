"""The previous step's bookkeeping taken again (dist_memopt/optim/step_cache.py): the same numbers
as bookkeeping built afresh every step, rebuilt whenever what it came from changes, and no
gradient kept alive between steps."""

from __future__ import annotations

import gc
import importlib.util
import os
import weakref

import pytest
import torch

import dist_memopt as dm
from dist_memopt.kernels import alada_cpu, smmf_cpu
from dist_memopt.shard.spec import Segment, ShardSpec, set_layout

_INTERPRETED = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"

SHAPES = [(64, 48), (300,), (5, 3, 3, 3), (), (129, 257), (40, 33)]

CASES = {
    "smmf": (dm.SMMF, dict(weight_decay=0.1)),
    "smmf-no-beta1": (dm.SMMF, dict(beta=None)),
    "alada": (dm.Alada, dict(weight_decay=0.1)),
    "alada-momentum-in-grad": (dm.Alada, dict(momentum_in_grad=True)),
}


def _grads(params, optimizer, step: int, in_grad: bool) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    if in_grad:
        optimizer.zero_grad()
        for p in params:
            p.grad.add_(torch.randn(p.shape, generator=generator).to(p.dtype), alpha=0.1)
    else:  # new tensors, as a backward after zero_grad(set_to_none=True) gives
        for p in params:
            p.grad = (0.1 * torch.randn(p.shape, generator=generator)).to(p.dtype)


def _train(name: str, dtype: torch.dtype, rebuild: bool):
    """Steps with the events a cached step must notice; ``rebuild`` drops the caches before
    every step, so every step builds its bookkeeping afresh."""
    cls, config = CASES[name]
    in_grad = config.get("momentum_in_grad", False)
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]
    set_layout(params[-1], [Segment(0, ShardSpec((40, 33), 10 * 33 + 5, 16 * 33 + 5))])  # a range cut mid-row
    # two groups of equal settings: their segments share the kernel calls while their schedules agree
    optimizer = cls([{"params": params[:3]}, {"params": params[3:]}], lr=1e-2, kernel="cpu", **config)
    late = torch.nn.Parameter(torch.randn((24, 20), generator=generator).to(dtype))
    for step in range(30):  # events at steps 3, 7, 11, 14, 17, 20, 23 and 26, plain steps between
        if step == 3:  # a group whose step counts are three behind the others': Alada's odd and
            # even steps then take the same kinds of kernels at every step, for other parameters
            optimizer.add_param_group({"params": [late], **config})
            params.append(late)
            if in_grad:
                late.grad = torch.zeros_like(late)
        if step == 7 and not in_grad:
            params[1].grad = None  # one parameter sits a step out (it is skipped)
        if step == 11:
            params[0].data = params[0].data.mul(0.5)  # new storage and values for a parameter
        if step == 14:
            optimizer.load_state_dict(optimizer.state_dict())
        if step == 17:  # a state tensor replaced in place of the old one
            state = optimizer.state[params[4]]
            key = "row_v" if cls is dm.SMMF else "row"
            state[key] = state[key].clone()
        if step == 26:  # a setting the items were built from: the first group leaves the kernels
            optimizer.param_groups[0]["kernel"] = "torch"
        if step == 20:
            del optimizer.state[params[2]]  # one parameter's state reset: it starts again
        for index, group in enumerate(optimizer.param_groups):
            # a schedule, read afresh at every step; from step 23 on, the second group's learning
            # rate differs from the first group's, with which it shared the kernels' calls
            group["lr"] = 1e-2 / (step + 1) * (0.5 if index == 1 and step >= 23 else 1.0)
        if rebuild:
            optimizer.__dict__.pop("_step_caches", None)
        if step != 7 or in_grad:
            _grads(params, optimizer, step, in_grad)
        else:
            _grads(params[:1] + params[2:], optimizer, step, in_grad)
        optimizer.step()
    state = optimizer.state_dict()["state"]
    return [p.detach() for p in params] + [v for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _count_table_builds(monkeypatch) -> dict[str, int]:
    """Calls of the runners' table builders, by runner ("smmf", "alada": CPU; "smmf_triton", "alada_triton")."""
    built = {"smmf": 0, "alada": 0}
    builders = [("smmf", smmf_cpu, "_tables"), ("alada", alada_cpu, "_tables")]
    if _INTERPRETED:
        from dist_memopt.kernels import alada_triton, smmf_triton

        built["smmf_triton"] = built["alada_triton"] = 0
        builders += [("smmf_triton", smmf_triton, "_build"), ("alada_triton", alada_triton, "_build")]
    for key, module, name in builders:
        build = getattr(module, name)

        def counted(jobs, build=build, key=key):
            built[key] += 1
            return build(jobs)

        monkeypatch.setattr(module, name, counted)
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_a_step_that_takes_the_previous_bookkeeping_again_gives_the_same_numbers(name, dtype, monkeypatch):
    built = _count_table_builds(monkeypatch)
    cached = _train(name, dtype, rebuild=False)
    built_cached = sum(built.values())
    rebuilt = _train(name, dtype, rebuild=True)
    built_afresh = sum(built.values()) - built_cached
    assert len(cached) == len(rebuilt)
    for a, b in zip(cached, rebuilt):
        assert torch.equal(a, b)
    # the cached run built its tables only after something changed: fewer times than the run that
    # builds them at every step
    assert built_cached < built_afresh, (built_cached, built_afresh)


def _train_triton(cls: type, rebuild: bool) -> list[torch.Tensor]:
    """Steps through the interpreted Triton kernels: new gradients and learning rates every step;
    from step 4 the second group's rate differs from the first's, with whose (24, 20) matrix its
    own shared a launch."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(24, 20), (7, 5, 3), (24, 20), (16, 33)]]
    set_layout(params[3], [Segment(0, ShardSpec((40, 33), 10 * 33 + 5, 26 * 33 + 5))])  # a range cut mid-row
    optimizer = cls([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, weight_decay=0.1, kernel="triton")
    optimizer.triton_devices = ("cuda", "cpu")
    for step in range(6):
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = 1e-2 / (step + 1) * (0.5 if index == 1 and step >= 4 else 1.0)
        if rebuild:
            optimizer.__dict__.pop("_step_caches", None)
        for p in params:
            p.grad = 0.1 * torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [p.detach() for p in params] + [v for s in optimizer.state_dict()["state"].values() for v in s.values()]


@pytest.mark.skipif(not _INTERPRETED, reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("cls, builds", [(dm.SMMF, 3), (dm.Alada, 5)], ids=["smmf", "alada"])
def test_the_triton_runners_take_their_tables_again_to_the_same_numbers(cls, builds, monkeypatch):
    """The Triton runners keep their launch table and write only the new gradients' offsets into
    it (the interpreter's guard checks every access against the tensors it was given)."""
    built = _count_table_builds(monkeypatch)
    key = f"{cls.__name__.lower()}_triton"
    rebuilt = _train_triton(cls, rebuild=True)  # first: a process's first kernel step also steps a probe (kernels.verify)
    before = built[key]
    cached = _train_triton(cls, rebuild=False)
    for a, b in zip(cached, rebuilt, strict=True):
        assert torch.equal(a, b)
    # SMMF: built at step 0 (the state is new), step 1 (kept from then on) and step 4 (a launch's
    # segments no longer share one schedule), taken again at steps 2, 3 and 5. Alada keeps a table
    # per phase: built at steps 0 (t = 0), 1 (odd), 2 (even), 4 and 5 (split schedules), taken
    # again at step 3
    assert built[key] - before == builds


def _steps_with_new_gradients(optimizer, params, steps: int):
    """Steps ``optimizer`` with new random gradients, yielding each step's index after it."""
    for step in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        yield step


def test_a_steady_loop_builds_its_kernel_tables_once_per_kind_of_step(monkeypatch):
    built = _count_table_builds(monkeypatch)
    for key, cls in (("smmf", dm.SMMF), ("alada", dm.Alada)):
        params = [torch.nn.Parameter(torch.randn(32, 24)) for _ in range(5)]
        optimizer = cls(params, kernel="cpu")
        for step in _steps_with_new_gradients(optimizer, params, 12):
            if step == 2:
                after_warmup = built[key]
        # SMMF: one table, built at the second step (the first creates the state); Alada: one for
        # odd and one for even steps (and t = 0's)
        assert built[key] == after_warmup, (key, built)
        assert after_warmup <= (2 if key == "smmf" else 4), (key, built)


@pytest.mark.parametrize("kernel", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(not _INTERPRETED, reason="needs triton and TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_the_optimizer_keeps_no_gradient_alive_between_steps(cls, kernel):
    params = [torch.nn.Parameter(torch.randn(16, 12)) for _ in range(3)]
    optimizer = cls(params, kernel=kernel)
    optimizer.triton_devices = ("cuda", "cpu")
    for _ in _steps_with_new_gradients(optimizer, params, 4):
        pass
    watched = [weakref.ref(p.grad) for p in params]
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in watched)
