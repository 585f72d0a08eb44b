"""StatReducer alone: slots summed over a group, over a chain of groups, or not at all."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from dist_memopt.shard.reduce import StatReducer
from harness import run_distributed


def _reduce(rank, world_size):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    halves = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair, half = pairs[rank // 2], halves[rank % 2]
    reducer = StatReducer()
    local = reducer.reserve(None, 2, torch.device("cpu"))
    over_pair = reducer.reserve(pair, 3, torch.device("cpu"))
    over_all = reducer.reserve((pair, half), 4, torch.device("cpu"))
    reducer.allocate()
    for ticket in (local, over_pair, over_all):
        reducer.slot(ticket).fill_(rank + 1.0)
    calls, real = [], dist.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        reducer.reduce(async_op=True)
        reducer.wait()
    finally:
        dist.all_reduce = real
    return dict(
        local=reducer.slot(local).tolist(),
        pair=reducer.slot(over_pair).tolist(),
        all=reducer.slot(over_all).tolist(),
        calls=calls,
        groups=len(reducer.groups),
        fingerprints=sorted(reducer.fingerprints().values()),
        bytes=reducer.communicated_bytes(),
    )


def test_slots_are_summed_over_their_group_or_chain():
    results = run_distributed(_reduce, 4)
    for rank, out in enumerate(results):
        assert out["local"] == [rank + 1.0] * 2  # no group: never communicated
        pair_sum = 3.0 if rank < 2 else 7.0  # (1 + 2) or (3 + 4)
        assert out["pair"] == [pair_sum] * 3
        assert out["all"] == [10.0] * 4  # the chain (pair, half) sums over all four ranks
        # one collective for the pair's buffer, two for the chain's; none for the local one
        assert sorted(out["calls"]) == [3, 4, 4] and out["groups"] == 2
        assert out["bytes"] == 4 * (3 + 2 * 4)
    # ranks that share a group agree on its fingerprint
    assert results[0]["fingerprints"] == results[1]["fingerprints"]


def _held_past_the_optimizer(rank, world_size):
    """An SMMF step on an FSDP2 shard leaves its all_reduce running; the optimizer is then freed."""
    import gc

    from torch.distributed.fsdp import fully_shard

    import dist_memopt as dm
    from dist_memopt.shard import running

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 13)  # 13 rows: uneven shards
    fully_shard(model)
    optimizer = dm.SMMF(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    held = running.held_count()
    child = os.fork()
    if child == 0:  # a data loader's worker: holds nothing, so waits for nothing at its exit
        os._exit(running.held_count())
    held_in_child = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    del optimizer
    gc.collect()
    held_after_free = running.held_count()
    running.wait_all()
    objects = [obj for pair in running._held for obj in pair]
    before = [sys.getrefcount(obj) for obj in objects]
    running.keep_for_good()
    after = [sys.getrefcount(obj) for obj in objects]
    kept = [a - b for a, b in zip(after, before)]
    return held, held_in_child, held_after_free, running.held_count(), running.running_count(), kept


def test_a_running_reduction_is_held_past_its_optimizer_and_waited_for_at_exit():
    """The collective's work and tensor outlive a freed optimizer (gloo's worker thread must not
    free them during finalization), and the exit hook completes it, then gives the work and the
    tensor a reference never dropped (the worker releases its own only after the wait returns);
    a forked child holds none of them."""
    results = run_distributed(_held_past_the_optimizer, 2)
    for held, in_child, after_free, after_wait, running_after_wait, kept in results:
        assert held >= 1 and in_child == 0 and after_free == held
        assert after_wait == held and running_after_wait == 0
        assert kept == [1] * (2 * held)


_EXITS_WITH_A_REDUCTION_RUNNING = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import dist_memopt as dm

torch.set_num_threads(1)
dist.init_process_group("gloo")


def train():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    fully_shard(model)
    optimizer = dm.SMMF(model.parameters())
    for _ in range(3):
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


train()  # returns with the last step's all_reduce running; no optimizer.synchronize()
dist.destroy_process_group()
"""


def test_a_process_exits_cleanly_with_a_reduction_running():
    """A user's loop that ends on step() and destroys the group exits with code 0 on every rank
    (without the held collectives, 2 of 3 such runs aborted with "terminate called without an
    active exception")."""
    import subprocess
    import sys

    from harness import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    ranks = [
        subprocess.Popen([sys.executable, "-c", _EXITS_WITH_A_REDUCTION_RUNNING], env=dict(env, RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    try:
        outputs = [rank.communicate(timeout=180)[0] for rank in ranks]
    finally:  # a hang fails the test, and leaves no rank behind
        for rank in ranks:
            rank.kill()
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0 and "terminate called" not in output, output
