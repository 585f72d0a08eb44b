"""SMMF and Alada held to what torch.optim optimizers do, table-driven over their option sets.

In the spirit of torch's own ``torch.testing._internal.common_optimizers``: every configuration in
:data:`CONFIGS` and every kernel that runs on CPU (:data:`CPU_KERNELS`, from
``dist_memopt.kernels.select.KERNELS``) goes through the same generic checks — non-contiguous
parameters of every rank, state_dict round trips, step and hook semantics, per-group settings, LR
schedulers, the for-loop against the batched path, parameter dtypes, tensor lr, refusals.
"""

from __future__ import annotations

import copy
import os
import io
import pickle
from typing import Any, Callable

import pytest
import torch

import dist_memopt as dm
from dist_memopt.kernels.select import KERNELS

#: name -> (class, options); each a distinct code path of the optimizers
CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "smmf": (dm.SMMF, dict(lr=1e-2)),
    "smmf-adam-decay": (dm.SMMF, dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adam")),
    "smmf-no-first-moment": (dm.SMMF, dict(lr=1e-2, beta=None)),
    "smmf-dense-vectors": (dm.SMMF, dict(lr=1e-2, weight_decay=0.1, vector_reshape=False)),
    "alada": (dm.Alada, dict(lr=1e-2, weight_decay=0.1)),
    "alada-in-grad": (dm.Alada, dict(lr=1e-2, momentum_in_grad=True)),
}
#: kernel values that run on CPU tensors without Triton's interpreter
CPU_KERNELS = tuple(k for k in KERNELS if k != "triton")


def _make(name: str, params: Any, kernel: str = "auto", **extra: Any) -> torch.optim.Optimizer:
    cls, options = CONFIGS[name]
    return cls(params, **{**options, "kernel": kernel, **extra})


def _grads(shape: tuple[int, ...], steps: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def _step_with(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """One step on given gradients, the way each mode's loop hands them over (momentum_in_grad:
    zero_grad decays .grad, backward adds the scaled gradient)."""
    optimizer.zero_grad()
    in_grad = optimizer.param_groups[0].get("momentum_in_grad", False)
    for param, grad in zip(params, grads):
        if in_grad:
            beta1 = optimizer.param_groups[0]["betas"][0]
            param.grad.add_(grad.to(param.dtype), alpha=1.0 - beta1)
        else:
            param.grad = grad.to(param.dtype)
    optimizer.step()


# --- non-contiguous parameters and gradients ---------------------------------------------------

def _strided(v: torch.Tensor) -> torch.Tensor:
    """``v``'s values every other element of a larger storage (a slice like ``w[..., 0]``)."""
    return torch.stack([v, torch.full_like(v, 7.0)], -1)[..., 0]


def _transposed(v: torch.Tensor) -> torch.Tensor:
    return v.transpose(0, -1).contiguous().transpose(0, -1)


def _channels_last(v: torch.Tensor) -> torch.Tensor:
    return v.contiguous(memory_format=torch.channels_last)


def _expanded(v: torch.Tensor) -> torch.Tensor:
    """Materialized from a broadcast: its own storage, dense."""
    return v[:1].expand_as(v).clone().copy_(v)


#: (shape, layout): every rank 0..4, with the layouts that make it non-contiguous
LAYOUTS: list[tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]] = [
    ((), torch.clone),
    ((9,), torch.clone),
    ((9,), _strided),
    ((10, 5), _strided),
    ((6, 10), _transposed),
    ((5, 4), _expanded),
    ((4, 5, 6), _strided),
    ((4, 5, 6), _transposed),
    ((3, 4, 5, 6), _channels_last),
    ((3, 4, 5, 6), _strided),
]


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("shape, layout", LAYOUTS, ids=[f"{len(s)}d-{f.__name__.strip('_')}" for s, f in LAYOUTS])
def test_non_contiguous_parameters_step_like_contiguous_ones(name, kernel, shape, layout):
    """Same values, other strides: the same result, written into the parameter's own storage."""
    start = torch.randn(shape)
    grads = _grads(shape, 3)
    for foreach in (None, False):
        odd = torch.nn.Parameter(layout(start.clone()))
        plain = torch.nn.Parameter(start.clone())
        strides, address = odd.stride(), odd.data_ptr()
        opt_odd = _make(name, [odd], kernel, foreach=foreach)
        opt_plain = _make(name, [plain], kernel, foreach=foreach)
        for grad in grads:
            _step_with(opt_odd, [odd], [layout(grad)])
            _step_with(opt_plain, [plain], [grad])
        assert odd.stride() == strides and odd.data_ptr() == address
        assert torch.equal(odd.detach(), plain.detach()), f"foreach={foreach}"


@pytest.mark.parametrize("name", CONFIGS)
def test_views_sharing_one_storage_step_independently(name):
    """Two parameters interleaved in one storage (w[..., 0] and w[..., 1]) and two contiguous
    halves of another: writing one back must not touch the other."""
    base, halves = torch.randn(6, 8, 2), torch.randn(2, 24)
    shared = [torch.nn.Parameter(base[..., 0]), torch.nn.Parameter(base[..., 1]),
              torch.nn.Parameter(halves[0]), torch.nn.Parameter(halves[1])]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in shared]
    grads = [_grads(tuple(p.shape), 3, seed=i) for i, p in enumerate(shared)]
    opt_shared, opt_alone = _make(name, shared), _make(name, alone)
    for step in range(3):
        _step_with(opt_shared, shared, [g[step] for g in grads])
        _step_with(opt_alone, alone, [g[step] for g in grads])
    for a, b in zip(shared, alone):
        assert torch.equal(a.detach(), b.detach())


# --- state_dict determinism ------------------------------------------------------------------

def _trained(name: str, kernel: str = "auto", **extra: Any) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (9,), ())]
    optimizer = _make(name, params, kernel, **extra)
    grads = [_grads(tuple(p.shape), 3, seed=i) for i, p in enumerate(params)]
    for step in range(3):
        _step_with(optimizer, params, [g[step] for g in grads])
    return optimizer, params


def _assert_same_state_dict(got: dict, expected: dict, skip: tuple[str, ...] = ()) -> None:
    assert got.keys() == expected.keys()
    assert len(got["param_groups"]) == len(expected["param_groups"])
    for a, b in zip(got["param_groups"], expected["param_groups"]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
    assert got["state"].keys() == expected["state"].keys()
    for index, state in got["state"].items():
        assert state.keys() == expected["state"][index].keys()
        for key, value in state.items():
            if key not in skip:
                assert torch.equal(value, expected["state"][index][key]), (index, key)


def _weights_only(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trips_are_the_identity(name, kernel):
    """state_dict -> load_state_dict -> state_dict, through torch.save (weights_only) and
    deepcopy: the same keys, values and param-group keys (none added)."""
    optimizer, params = _trained(name, kernel)
    saved = optimizer.state_dict()
    for loaded in (saved, _weights_only(saved), copy.deepcopy(saved)):
        fresh = _make(name, [torch.nn.Parameter(p.detach().clone()) for p in params], kernel)
        fresh.load_state_dict(loaded)
        _assert_same_state_dict(fresh.state_dict(), saved)
        fresh.load_state_dict(fresh.state_dict())
        _assert_same_state_dict(fresh.state_dict(), saved)
    # copying a parameter (deepcopy, pickle) drops its .grad, and with it the momentum that
    # momentum_in_grad keeps there: a checkpoint is state_dict()
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        _assert_same_state_dict(copied.state_dict(), saved, skip=("exp_avg_in_grad",))


@pytest.mark.parametrize("name", ["smmf", "alada"])
def test_a_loaded_state_dict_adds_no_param_group_key(name):
    optimizer, params = _trained(name)
    fresh = _make(name, params)
    fresh.load_state_dict(optimizer.state_dict())
    assert set(fresh.state_dict()["param_groups"][0]) == set(optimizer.state_dict()["param_groups"][0])
    assert "differentiable" not in copy.deepcopy(optimizer).param_groups[0]
    assert "differentiable" not in pickle.loads(pickle.dumps(optimizer)).param_groups[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_older_state_dicts_still_load(name):
    """Param groups with ``differentiable: False`` and Python-number steps (as torch loads them)."""
    optimizer, params = _trained(name)
    old = optimizer.state_dict()
    for group in old["param_groups"]:
        group["differentiable"] = False
    for state in old["state"].values():
        state["step"] = int(state["step"].item())
        state.pop("exp_avg_in_grad", None)  # saved before in-gradient momentum was carried
    fresh = _make(name, params)
    if name == "alada-in-grad":
        with pytest.warns(UserWarning, match="lacks 'exp_avg_in_grad'"):
            fresh.load_state_dict(old)
    else:
        fresh.load_state_dict(old)
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 3 for s in fresh.state.values())
    assert fresh.state_dict()["param_groups"][0]["differentiable"] is False


def test_a_step_that_is_not_a_count_is_refused():
    optimizer, params = _trained("smmf")
    saved = optimizer.state_dict()
    saved["state"][0]["step"] = "three"
    with pytest.raises(ValueError, match=r"loaded state 'step' of .* is 'three': expected a step count"):
        _make("smmf", params).load_state_dict(saved)


# --- momentum_in_grad resume -----------------------------------------------------------------

def _linear_run(save_at: int | None, steps: int = 10) -> list[torch.Tensor]:
    """Linear(8, 4), Alada(momentum_in_grad=True); with ``save_at``, saved there through
    torch.save and resumed in fresh objects."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = dm.Alada(model.parameters(), lr=1e-2, momentum_in_grad=True)
    inputs = [torch.randn(16, 8) for _ in range(steps)]
    for step in range(steps):
        if step == save_at:
            checkpoint = _weights_only({"model": model.state_dict(), "optim": optimizer.state_dict()})
            model = torch.nn.Linear(8, 4)
            model.load_state_dict(checkpoint["model"])
            optimizer = dm.Alada(model.parameters(), lr=1e-2, momentum_in_grad=True)
            optimizer.load_state_dict(checkpoint["optim"])
        optimizer.zero_grad()
        optimizer.scale_loss(model(inputs[step]).square().mean()).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_momentum_in_grad_resumes_bit_identically():
    for a, b in zip(_linear_run(None), _linear_run(5)):
        assert torch.equal(a, b)


def test_momentum_in_grad_state_dict_carries_a_copy_of_the_gradient():
    optimizer, params = _trained("alada-in-grad")
    saved = optimizer.state_dict()
    assert torch.equal(saved["state"][0]["exp_avg_in_grad"], params[0].grad.reshape(-1))
    assert saved["state"][0]["exp_avg_in_grad"].data_ptr() != params[0].grad.data_ptr()
    assert all("exp_avg_in_grad" not in s for s in optimizer.state.values())  # only while saving
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = _make("alada-in-grad", fresh_params)
    fresh.load_state_dict(saved)  # no .grad yet: allocated
    for p, q in zip(params, fresh_params):
        assert torch.equal(p.grad, q.grad)
    held = fresh_params[0].grad
    fresh.load_state_dict(saved)  # an existing .grad is written in place
    assert fresh_params[0].grad is held


# --- step, zero_grad, hooks ------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_step_zero_grad_and_hooks_behave_as_in_torch(name):
    param, idle = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    optimizer = _make(name, [param, idle])
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("sd pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("sd post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))
    optimizer.zero_grad()

    losses: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        calls.append("closure")
        losses.append((param * param).sum())
        getattr(optimizer, "scale_loss", lambda x: x)(losses[-1]).backward()
        return losses[-1]

    assert optimizer.step(closure) is losses[0]
    assert calls == ["pre", "closure", "post"]
    assert idle not in optimizer.state or name == "alada-in-grad"  # no gradient: not stepped
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls[3:] == ["sd pre", "sd post", "load pre", "load post"]
    optimizer.zero_grad()
    if name == "alada-in-grad":
        assert param.grad is not None  # it holds the momentum, decayed by beta1
    else:
        assert param.grad is None
        param.grad = torch.ones_like(param)
        optimizer.zero_grad(set_to_none=False)
        assert torch.equal(param.grad, torch.zeros_like(param))


@pytest.mark.parametrize("name", CONFIGS)
def test_per_group_lr_and_weight_decay(name):
    """lr 0 leaves a group as it is; with zero gradients, decoupled decay alone moves the weight."""
    frozen, decayed = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    before = frozen.detach().clone(), decayed.detach().clone()
    optimizer = _make(name, [{"params": [frozen], "lr": 0.0}, {"params": [decayed], "lr": 0.1}])
    _step_with(optimizer, [frozen, decayed], [torch.randn(6, 4), torch.zeros(6, 4)])
    assert torch.equal(frozen.detach(), before[0])
    group = optimizer.param_groups[1]
    if group["weight_decay"] and group.get("weight_decay_mode", "adamw") == "adamw":
        torch.testing.assert_close(decayed.detach(), before[1] * (1 - 0.1 * group["weight_decay"]), rtol=1e-6, atol=0)


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=20, cycle_momentum=False),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", CONFIGS)
def test_lr_schedulers_move_the_loss_down(name, scheduler):
    torch.manual_seed(0)
    target, weight = torch.randn(8, 6), torch.nn.Parameter(torch.zeros(8, 6))
    optimizer = _make(name, [weight], lr=0.1)
    schedule = SCHEDULERS[scheduler](optimizer)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (weight - target).square().mean()
        getattr(optimizer, "scale_loss", lambda x: x)(loss).backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert optimizer.param_groups[0]["lr"] == schedule.get_last_lr()[0]


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("name", CONFIGS)
def test_for_loop_and_batched_paths_agree(name, kernel):
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in ((4, 3), (4, 3), (7,), (7,), ())]
        optimizer = _make(name, params, kernel, foreach=foreach)
        grads = [_grads(tuple(p.shape), 3, seed=i) for i, p in enumerate(params)]
        for step in range(3):
            _step_with(optimizer, params, [g[step] for g in grads])
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


#: dtype -> how close 5 steps stay to the fp64 parameters' run: a few roundings of weights up to
#: about 3 (bf16 and fp16 keep 8 and 11 bits)
DTYPES = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_dtypes_step_in_their_own_dtype(name, dtype):
    start, grads = torch.randn(6, 5), _grads((6, 5), 5)
    runs = {}
    for run_dtype in (torch.float64, dtype):
        param = torch.nn.Parameter(start.to(run_dtype))
        optimizer = _make(name, [param])
        for grad in grads:
            _step_with(optimizer, [param], [grad])
        assert param.dtype == run_dtype
        runs[run_dtype] = param.detach().double()
    torch.testing.assert_close(runs[dtype], runs[torch.float64], rtol=0, atol=DTYPES[dtype])


# --- tensor lr, refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_a_tensor_lr_steps_like_the_number_and_is_read_at_each_step(name):
    start, grads = torch.randn(5, 4), _grads((5, 4), 4)
    numeric, tensor = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    lr = torch.tensor(1e-2)
    opt_numeric, opt_tensor = _make(name, [numeric]), _make(name, [tensor], lr=lr)
    for step, grad in enumerate(grads):
        if step == 2:
            lr.fill_(3e-2)  # as torch's LR schedulers change a tensor lr
            opt_numeric.param_groups[0]["lr"] = 3e-2
        _step_with(opt_numeric, [numeric], [grad])
        _step_with(opt_tensor, [tensor], [grad])
    assert torch.equal(numeric.detach(), tensor.detach())
    _assert_same_state_dict(_weights_only(opt_tensor.state_dict()), opt_tensor.state_dict())


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_lr_errors_say_what_is_wrong(cls):
    param = torch.nn.Parameter(torch.randn(3))
    for lr, match in [
        (torch.tensor([1e-3, 1e-3]), r"a tensor lr must hold one floating-point element, got shape \(2,\)"),
        (torch.tensor(1), r"a tensor lr must hold one floating-point element, got shape \(\) of torch.int64"),
        (torch.tensor(-1.0), r"Invalid lr: -1.0 \(must be >= 0.0\)"),
        ("1e-3", r"Invalid lr: '1e-3' is a str \(must be a finite number\)"),
        (float("nan"), r"Invalid lr: nan \(must be finite\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            cls([param], lr=lr)


@pytest.mark.parametrize("cls", [dm.SMMF, dm.Alada])
def test_complex_parameters_and_sparse_gradients_are_refused(cls):
    with pytest.raises(ValueError, match="does not support complex parameters.*view_as_real"):
        cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = cls([param])
    param.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert not optimizer.state


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run on CPU in the interpreter only")
@pytest.mark.parametrize("name", ["smmf", "alada-in-grad"])
def test_non_contiguous_parameters_on_the_triton_path(name):
    """The kernels address elements as offsets from one pointer: they get contiguous copies,
    written back into the strided parameters; bf16 in its own dtype, fp32 alike."""
    runs = {}
    for kernel in ("triton", "torch"):
        params = [torch.nn.Parameter(_strided(torch.randn(10, 5, generator=torch.Generator().manual_seed(0)))),
                  torch.nn.Parameter(_transposed(torch.randn(6, 9, generator=torch.Generator().manual_seed(1))).bfloat16())]
        optimizer = _make(name, params, kernel)
        grads = [_grads(tuple(p.shape), 2, seed=i) for i, p in enumerate(params)]
        for step in range(2):
            _step_with(optimizer, params, [_transposed(g[step]) for g in grads])
        assert not params[0].is_contiguous() and not params[1].is_contiguous()
        runs[kernel] = [p.detach().float() for p in params]
    torch.testing.assert_close(runs["triton"][0], runs["torch"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(runs["triton"][1], runs["torch"][1], rtol=0, atol=1e-2)  # a bf16 rounding
