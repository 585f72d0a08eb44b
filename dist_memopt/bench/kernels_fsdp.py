"""``bench kernels`` under FSDP2: the same counts on CPU ranks, for GPT-2 small's local shards.

Each rank wraps GPT-2 small with ``fully_shard`` (per block, then the whole model), runs one
backward for sharded gradients, then counts every optimizer's steps as in one process; the
statistics all_reduce counts as one launch (a collective is a kernel on NCCL). Rank 0's counts
are reported, per element of its local shards.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["fsdp2_costs"]


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, queue) -> None:  # noqa: ANN001
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.fsdp import fully_shard
        from transformers import GPT2Config, GPT2LMHeadModel

        from dist_memopt.bench.counting import count_step
        from dist_memopt.bench.optimizers import build_optimizer

        torch.manual_seed(0)
        config = GPT2Config(n_positions=64)
        model = GPT2LMHeadModel(config)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        tokens = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(rank))
        model(tokens, labels=tokens).loss.backward()
        params = list(model.parameters())
        numel = sum(p.to_local().numel() for p in params)
        rows = {}
        for name in args.optimizers:
            # CPU ranks (TRITON_INTERPRET=1 from the parent): count, do not interpret
            rows[name] = count_step(build_optimizer(name, params), numel, steps=args.count_steps, execute=False)
        queue.put((rank, rows))
    finally:
        dist.destroy_process_group()


def fsdp2_costs(world_size: int, optimizers: Sequence[str], count_steps: int = 2, timeout: float = 1800) -> dict[str, Any]:
    """Rank 0's :func:`~dist_memopt.bench.kernels.count_step` rows under FSDP2 on ``world_size`` CPU ranks."""
    from dist_memopt.bench.ranks import spawn_ranks

    args = argparse.Namespace(optimizers=list(optimizers), count_steps=count_steps, rank_timeout=timeout)
    return spawn_ranks(_rank_main, world_size, args)[0]
