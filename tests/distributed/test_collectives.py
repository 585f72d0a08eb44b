"""Communication: constant collectives per step, none for DDP, mismatches fail instead of hanging.

Every case runs in one 2-rank launch (harness.Launch, a module-scoped fixture); each test reads its own.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import dist_memopt as dm
from dist_memopt import Segment, ShardSpec, set_layout
from dist_memopt.shard.geometry import square_matricize
from harness import Launch
from models import AwkwardModel, loss_fn


class _CountingAllReduce:
    """Counts dist.all_reduce calls (the real collective still runs)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = dist.all_reduce

    def __enter__(self) -> "_CountingAllReduce":
        def counted(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._real


def _stack(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(7, 7) for _ in range(layers)])


def _collectives_per_step(rank, world_size):
    counts = {}
    for cls_name in ("SMMF", "Alada"):
        for layers in (2, 12):
            model = _stack(layers)
            for layer in model:
                fully_shard(layer)
            fully_shard(model)
            optimizer = getattr(dm, cls_name)(model.parameters(), lr=1e-2)
            per_step = []
            for step in range(4):
                optimizer.zero_grad()
                model(torch.randn(4, 7, generator=torch.Generator().manual_seed(step))).square().mean().backward()
                with _CountingAllReduce() as counter:
                    optimizer.step()
                per_step.append(counter.calls)
            counts[cls_name, layers] = per_step
    return counts


def test_collectives_per_step_do_not_grow_with_parameters(two_ranks):
    counts = two_ranks.case("collectives per step")[0]
    # one probe (non-finite verdict + layout fingerprint) and one statistics all_reduce per step,
    # for 2 layers (4 parameters) as for 12 layers (24 parameters)
    for cls_name in ("SMMF", "Alada"):
        assert counts[cls_name, 2] == counts[cls_name, 12] == [2, 2, 2, 2], counts


def _probed_steps(rank, world_size, check_finite):
    from dist_memopt.bench.counting import StepCost

    model = _stack(3)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = dm.SMMF(model.parameters(), lr=1e-2, check_finite=check_finite)
    collectives, syncs, uploads = [], [], []
    for step in range(4):
        optimizer.zero_grad()
        model(torch.randn(4, 7, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        with _CountingAllReduce() as counter, StepCost() as cost:
            optimizer.step()
        collectives.append(counter.calls)
        syncs.append(cost.sync_count)
        uploads.append(cost.uploads)
    return collectives, syncs, uploads


def test_without_check_finite_the_layout_is_agreed_once(two_ranks):
    """check_finite=False: the probe runs on the first step only (layouts known), no host syncs after."""
    for collectives, syncs, _ in two_ranks.case("unchecked steps"):
        assert collectives == [2, 1, 1, 1]
        assert syncs[1:] == [0, 0, 0]  # the first step also resolves the layouts


def test_the_probe_of_a_checked_step_is_its_one_sync(two_ranks):
    """check_finite=True: the probe runs every step; reading its verdict is the step's one host
    sync, and the probe's fingerprint stays on the device, not made from host data each step (a
    blocking copy to a GPU)."""
    for collectives, syncs, uploads in two_ranks.case("checked steps"):
        assert collectives == [2, 2, 2, 2]
        assert syncs[1:] == [1, 1, 1]
        assert uploads[2:] == [0, 0]  # the CPU kernels' host tables are built at the first two steps


def _ddp_run(rank, world_size):
    torch.manual_seed(0)
    model = DDP(AwkwardModel())
    optimizer = dm.SMMF(model.parameters(), lr=1e-2)
    calls = 0
    for step in range(5):
        optimizer.zero_grad()
        loss_fn(model, step).backward()
        with _CountingAllReduce() as counter:
            optimizer.step()
        calls += counter.calls
    return calls, {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}


def test_ddp_needs_no_optimizer_communication(two_ranks):
    torch.manual_seed(0)
    reference = AwkwardModel()
    optimizer = dm.SMMF(reference.parameters(), lr=1e-2)
    for step in range(5):
        optimizer.zero_grad()
        loss_fn(reference, step).backward()
        optimizer.step()
    for calls, params in two_ranks.case("ddp"):
        assert calls == 0
        for name, p in reference.named_parameters():
            assert (params[name] - p.detach()).abs().max().item() <= 1e-6


def _per_rank_state(rank, world_size):
    torch.manual_seed(0)
    model = nn.Linear(40, 23, bias=False)  # 920 elements: (40, 23) after square matricization
    fully_shard(model)
    optimizer = dm.SMMF(model.parameters(), lr=1e-2)
    model(torch.randn(3, 40)).sum().backward()
    optimizer.step()
    optimizer.synchronize()
    local = model.weight.to_local().numel()
    return dm.state_bytes(optimizer), local


def test_sign_state_is_divided_across_ranks(two_ranks):
    rows, cols = square_matricize(23 * 40)
    factors = 4 * 2 * (rows + cols)  # row/col sums of |M| and of V, fp32, on every rank
    results = two_ranks.case("per-rank state")
    assert [local for _, local in results] == [12 * 40, 11 * 40]
    for held, local in results:
        assert held == math.ceil(local / 8) + factors + 4  # + the step counter


def _bad_input(rank, world_size):
    """Three failures that must raise on every rank, change nothing and never hang."""
    # 1. ranks disagree on a parameter's global shape
    param = nn.Parameter(torch.randn(20 + 8 * rank))
    shape = (10 + 2 * rank, 4)
    set_layout(param, [Segment(0, ShardSpec(shape, 0, param.numel(), dist.group.WORLD))])
    optimizer = dm.SMMF([param])
    param.grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match="step different parameters, shapes or placements"):
        optimizer.step()
    mismatch_state = sum(len(s) for s in optimizer.state.values())

    # 2. a non-finite gradient on one rank's shard only
    model = AwkwardModel()
    fully_shard(model.proj)
    fully_shard(model, ignored_params={model.scale})
    optimizer = dm.Alada(model.named_parameters(), lr=1e-2)
    loss_fn(model, 0).backward()
    if rank == 1:
        model.proj.weight.grad.to_local()[0, 0] = float("nan")
    with pytest.raises(dm.NonFiniteGradientError, match="proj.weight"):
        optimizer.step()
    nonfinite_state = sum(len(s) for s in optimizer.state.values())

    # 3. a process group this rank is not part of
    other = dist.new_group([1])
    if rank == 0:
        with pytest.raises(ValueError, match="does not contain this rank"):
            ShardSpec((4, 4), 0, 8, other)
    dist.barrier()  # rank 1 builds `other` through the store rank 0 hosts: rank 0 must not leave first
    return mismatch_state, nonfinite_state


def test_bad_input_fails_on_every_rank_without_hanging_or_changing_state(two_ranks):
    assert two_ranks.case("bad input") == [(0, 0), (0, 0)]


@pytest.fixture(scope="module")
def two_ranks():
    cases = {
        "collectives per step": (_collectives_per_step, ()),
        "unchecked steps": (_probed_steps, (False,)),
        "checked steps": (_probed_steps, (True,)),
        "ddp": (_ddp_run, ()),
        "per-rank state": (_per_rank_state, ()),
        "bad input": (_bad_input, ()),  # a hang in any case times the launch out and fails every test
    }
    return Launch(cases, 2, timeout=300)
