"""GPT-2 small under FSDP2 on CPU ranks: per-rank optimizer state, communication and step time.

For AdamW, SMMF and Alada, each at 2 and 4 ranks: the optimizer-state bytes each rank holds,
the bytes the optimizer puts into all_reduce per step against the bytes FSDP2 reduce-scatters for
the gradients in the same step (both counted at the collective calls of a real training step), and
the median optimizer.step() time relative to AdamW under the same wrapping (the optimizers step
in turn, one model each, each taking :data:`~dist_memopt.bench.step.STEPS_PER_SAMPLE` consecutive
steps per round, and a ratio is taken within each round). Then the same for
GPT-2 small's blocks under FSDP2 × tensor parallelism (:mod:`dist_memopt.bench.sharded_2d`).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import torch
import torch.distributed as dist

from dist_memopt.bench.ranks import OPTIMIZERS, CollectiveBytes, interleaved_steps, make_optimizer, spawn_ranks
from dist_memopt.bench.registry import Benchmark, register
from dist_memopt.bench.step import STEPS_PER_SAMPLE


def _gpt2(seq_length: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=max(seq_length, 64))
    torch.manual_seed(0)
    return GPT2LMHeadModel(config), config


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.fsdp import fully_shard

        import dist_memopt as dm

        results, optimizers, models = {}, {}, []  # models: kept alive for the interleaved rounds
        for name in OPTIMIZERS:
            model, config = _gpt2(args.seq_length)
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
            optimizer = make_optimizer(name, model.parameters())
            tokens = torch.randint(0, config.vocab_size, (1, args.seq_length), generator=torch.Generator().manual_seed(rank))
            with CollectiveBytes() as backward_bytes:
                model(tokens, labels=tokens).loss.backward()
            with CollectiveBytes() as step_bytes:
                optimizer.step()
                if hasattr(optimizer, "synchronize"):
                    optimizer.synchronize()
            results[name] = dict(
                state_bytes=dm.state_bytes(optimizer),
                optimizer_all_reduce_bytes=step_bytes.all_reduce,
                grad_reduce_scatter_bytes=backward_bytes.reduce_scatter,
                local_params=sum(p.to_local().numel() for p in model.parameters()),
            )
            optimizers[name] = optimizer
            models.append(model)
        for name, timing in interleaved_steps(optimizers, args.repeats).items():
            results[name].update(timing)
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated numbers of CPU ranks (default 2,4; empty: only the 2-D case)")
    parser.add_argument("--seq-length", type=int, default=32, help="tokens in the one measured batch (default 32)")
    parser.add_argument("--rank-timeout", type=float, default=3600, help="seconds to wait for the ranks")
    from dist_memopt.bench.sharded_2d import add_arguments as add_2d_arguments

    add_2d_arguments(parser)


def run(args: argparse.Namespace) -> dict:
    from dist_memopt.bench.sharded_2d import check_arguments, run_2d

    check_arguments(args)
    report: dict[str, Any] = {}
    lines = [
        f"GPT-2 small (124M) under FSDP2 on CPU/gloo; per rank (worst rank for bytes, median rank time per step of rounds of {STEPS_PER_SAMPLE} consecutive steps; vs AdamW: AdamW(fused=True), the median of the ratios within each round)",
        f"{'ranks':>5} {'optimizer':<13} {'state MiB':>10} {'vs AdamW':>9} {'opt all_reduce':>15} "
        f"{'grad reduce-scatter':>20} {'extra comm':>10} {'step s':>8} {'vs AdamW':>9}",
    ]
    for world_size in [int(w) for w in args.world_sizes.split(",") if w]:
        per_rank = spawn_ranks(_rank_main, world_size, args)
        summary = {}
        for name in OPTIMIZERS:
            ranks = [r[name] for r in per_rank]
            summary[name] = dict(
                state_bytes=max(r["state_bytes"] for r in ranks),
                optimizer_all_reduce_bytes=max(r["optimizer_all_reduce_bytes"] for r in ranks),
                grad_reduce_scatter_bytes=max(r["grad_reduce_scatter_bytes"] for r in ranks),
                step_seconds=statistics.median(r["step_seconds"] for r in ranks),
                vs_adamw=statistics.median(r["vs_baseline"] for r in ranks),
            )
        adamw = summary["AdamW"]
        for name, s in summary.items():
            s["extra_comm_fraction"] = s["optimizer_all_reduce_bytes"] / max(1, s["grad_reduce_scatter_bytes"])
            lines.append(
                f"{world_size:>5} {name:<13} {s['state_bytes'] / 2**20:>10.2f} "
                f"{s['state_bytes'] / adamw['state_bytes']:>8.1%} {s['optimizer_all_reduce_bytes']:>15,} "
                f"{s['grad_reduce_scatter_bytes']:>20,} {s['extra_comm_fraction']:>10.3%} "
                f"{s['step_seconds']:>8.3f} {s['vs_adamw']:>8.2f}x"
            )
        report[str(world_size)] = summary
    lines.append("target: the optimizer's extra communication under 1% of the gradient reduce-scatter bytes")
    print("\n".join(lines) + "\n")
    report["2d"] = run_2d(args)
    return report


register(
    Benchmark(
        name="sharded",
        summary="GPT-2 small under FSDP2 at 2 and 4 CPU ranks, and its blocks under FSDP2 x TP (dp=2, tp=2): per-rank state, optimizer vs reduce-scatter bytes, step time",
        run=run,
        add_arguments=add_arguments,
        defaults={"repeats": 5},
    )
)
