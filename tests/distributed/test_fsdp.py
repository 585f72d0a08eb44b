"""FSDP2, FSDP1 and HSDP: after 10 steps the sharded run's full parameters equal one process.

Every rank trains on the same batches, so FSDP's averaged gradient is the single-process gradient
up to rounding; the tolerance is 1e-6 of the parameter scale. The ranks step with ``kernel="auto"``
(the fused CPU kernels), the single process with the torch path. The model holds a
weight with 23 rows (uneven on 2 and 3 ranks), one with 2 rows (an empty shard on 3 ranks), a
prime-sized vector, a 4-D conv kernel, vectors and a scalar (FSDP rejects 0-d parameters, so the
scalar stays outside FSDP, replicated: a group mixing sharded and unsharded parameters).

The cases run in one launch per world size (harness.Launch, module-scoped fixtures).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy, fully_shard

import dist_memopt as dm
from harness import Launch
from models import AwkwardModel, loss_fn

STEPS = 10
TOLERANCE = 1e-6

CONFIGS = {
    "smmf-adamw": ("SMMF", dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adamw")),
    "smmf-adam": ("SMMF", dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="adam")),
    "smmf-no-first-moment": ("SMMF", dict(lr=1e-2, beta=None)),
    "alada": ("Alada", dict(lr=1e-2, weight_decay=0.05)),
}


@functools.cache
def _single_process(name: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    cls_name, config = CONFIGS[name]
    torch.manual_seed(0)
    model = AwkwardModel()
    optimizer = getattr(dm, cls_name)(model.parameters(), kernel="torch", **config)  # the ranks: kernel="auto", the CPU kernels
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace("_fsdp_wrapped_module.", ""): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def fsdp2_model(mesh=None) -> AwkwardModel:
    torch.manual_seed(0)
    model = AwkwardModel()
    for module in (model.conv, model.proj, model.head):
        fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh, ignored_params={model.scale})


def _train(model, optimizer, steps, in_grad=False):
    for step in steps:
        optimizer.zero_grad()
        loss = loss_fn(model, step)
        (optimizer.scale_loss(loss) if in_grad else loss).backward()
        optimizer.step()


def _fsdp2_runs(rank, world_size, names, mesh_shape=None):
    mesh = None
    if mesh_shape is not None:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    results = {}
    for name in names:
        cls_name, config = CONFIGS[name]
        model = fsdp2_model(mesh)
        optimizer = getattr(dm, cls_name)(model.parameters(), **config)
        _train(model, optimizer, range(STEPS))
        results[name] = _full(model)
        if cls_name == "Alada":  # p, q, v0: held whole on every rank, refit there from the reduced statistics
            results[("factors", name)] = [optimizer.state[p][k].clone() for p in model.parameters() for k in ("row", "col", "v0")]
    return results


def _fsdp1_runs(rank, world_size, names, use_orig_params):
    results = {}
    for name in names:
        cls_name, config = CONFIGS[name]
        torch.manual_seed(0)
        inner = AwkwardModel()
        model = FSDP(
            inner,
            device_id=torch.device("cpu"),
            use_orig_params=use_orig_params,
            ignored_states=[inner.scale],
            sharding_strategy=ShardingStrategy.FULL_SHARD,
        )
        optimizer = getattr(dm, cls_name)(model.parameters(), **config)
        _train(model, optimizer, range(STEPS))
        with FSDP.summon_full_params(model):
            results[name] = _full(model)
    return results


def _assert_all_equal_single(results_per_rank, names):
    for name in names:
        reference = _single_process(name)
        for rank, results in enumerate(results_per_rank):
            for param, expected in reference.items():
                got = results[name][param]
                scale = max(1.0, expected.abs().max().item())
                error = (got - expected).abs().max().item()
                assert error <= TOLERANCE * scale, f"{name}, rank {rank}, {param}: off by {error:.3g}"


ALL = list(CONFIGS)
FSDP1_NAMES = ["smmf-adamw", "smmf-no-first-moment", "alada"]
HSDP_NAMES = ["smmf-adamw", "alada"]


@pytest.fixture(scope="module")
def launches():
    """world size -> its launch, started on first use."""
    cases = {
        2: {"fsdp2": (_fsdp2_runs, (ALL,)), "alada in grad": (_alada_in_grad, ()), "engine finish": (_engine_finish, ())},
        3: {
            "fsdp2": (_fsdp2_runs, (ALL,)),
            ("fsdp1", False): (_fsdp1_runs, (FSDP1_NAMES, False)),
            ("fsdp1", True): (_fsdp1_runs, (FSDP1_NAMES, True)),
        },
        4: {"hsdp": (_fsdp2_runs, (HSDP_NAMES, (2, 2)))},
    }
    started = {}

    def launch(world_size: int) -> Launch:
        if world_size not in started:
            started[world_size] = Launch(cases[world_size], world_size)
        return started[world_size]

    return launch


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_equals_single_process(world_size, launches):
    _assert_all_equal_single(launches(world_size).case("fsdp2"), ALL)


@pytest.mark.parametrize("world_size", [2, 3])
def test_alada_factors_are_the_same_on_every_rank(world_size, launches):
    """p, q and v0 are whole on every rank: a rank refits the rows it holds in its one-pass even
    steps and the others' rows from the reduced statistic, with the same operations, so every rank
    ends with the same bits."""
    per_rank = [results[("factors", "alada")] for results in launches(world_size).case("fsdp2")]
    for other in per_rank[1:]:
        assert all(torch.equal(a, b) for a, b in zip(per_rank[0], other, strict=True))


def test_hsdp_2x2_equals_single_process(launches):
    """(Replicate, Shard) mesh: statistics reduced over the shard dim only; replicas identical."""
    _assert_all_equal_single(launches(4).case("hsdp"), HSDP_NAMES)


@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat", "orig-params"])
def test_fsdp1_equals_single_process(use_orig_params, launches):
    _assert_all_equal_single(launches(3).case(("fsdp1", use_orig_params)), FSDP1_NAMES)


def _alada_in_grad(rank, world_size):
    model = fsdp2_model()
    optimizer = dm.Alada(model.parameters(), lr=1e-2, weight_decay=0.05, momentum_in_grad=True)
    _train(model, optimizer, range(STEPS), in_grad=True)
    held = {k for state in optimizer.state.values() for k in state}
    return _full(model), sorted(held)


def test_alada_momentum_in_fsdp2_grads(launches):
    """FSDP2 accumulates reduce-scattered gradients into the existing .grad: M lives there."""
    reference = _single_process("alada")
    for full, keys in launches(2).case("alada in grad"):
        assert "exp_avg" not in keys
        for name, expected in reference.items():
            assert (full[name] - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max().item())


def _engine_finish(rank, world_size):
    from dist_memopt.train.backends.base import Engine

    class _Held(Engine):  # the launcher's engines differ only in how they build and save
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def save(self, path):
            raise NotImplementedError

        def load(self, path):
            raise NotImplementedError

    model = fsdp2_model()
    optimizer = dm.SMMF(model.parameters(), lr=1e-2)
    _train(model, optimizer, range(2))
    left = optimizer.pending_bytes()
    _Held(optimizer).finish()
    return left, optimizer.pending_bytes()


def test_engine_finish_completes_the_last_reduction(launches):
    """The launcher calls Engine.finish() before destroying the process group: SMMF's last
    all_reduce, left in flight by its step, is complete by then."""
    for left, after in launches(2).case("engine finish"):
        assert left > 0 and after == 0
