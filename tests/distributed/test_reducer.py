"""StatReducer alone: slots summed over a group, over a chain of groups, or not at all."""

from __future__ import annotations

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
