"""GPT-2 small under FSDP2 on CPU ranks: per-rank optimizer state, communication and step time.

For AdamW, SMMF and Alada, each at 2 and 4 ranks: the optimizer-state bytes each rank holds,
the bytes the optimizer puts into all_reduce per step against the bytes FSDP2 reduce-scatters for
the gradients in the same step (both counted at the collective calls of a real training step), and
the median optimizer.step() time relative to AdamW under the same wrapping.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from dist_memopt.bench.registry import Benchmark, register

OPTIMIZERS = ("AdamW", "SMMF", "Alada")


class _CollectiveBytes:
    """Counts input bytes of all_reduce and reduce-scatter calls (they still run)."""

    def __init__(self) -> None:
        self.all_reduce = 0
        self.reduce_scatter = 0
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> "_CollectiveBytes":
        def all_reduce(tensor, *args, **kwargs):
            self.all_reduce += tensor.numel() * tensor.element_size()
            return self._originals["all_reduce"](tensor, *args, **kwargs)

        def counted_reduce_scatter(name: str):
            def reduce_scatter(*args, **kwargs):
                tensor = kwargs["input"] if "input" in kwargs else args[1]
                self.reduce_scatter += tensor.numel() * tensor.element_size()
                return self._originals[name](*args, **kwargs)

            return reduce_scatter

        wrappers = [("all_reduce", all_reduce)]
        wrappers += [(n, counted_reduce_scatter(n)) for n in ("reduce_scatter_tensor", "reduce_scatter_single")]
        for name, fn in wrappers:
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, fn)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


def _gpt2(seq_length: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=max(seq_length, 64))
    torch.manual_seed(0)
    return GPT2LMHeadModel(config), config


def _make_optimizer(name: str, params):
    import dist_memopt as dm

    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return getattr(dm, name)(params, lr=1e-4)


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.fsdp import fully_shard

        import dist_memopt as dm

        results = {}
        for name in OPTIMIZERS:
            model, config = _gpt2(args.seq_length)
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
            optimizer = _make_optimizer(name, model.parameters())
            tokens = torch.randint(0, config.vocab_size, (1, args.seq_length), generator=torch.Generator().manual_seed(rank))
            with _CollectiveBytes() as backward_bytes:
                model(tokens, labels=tokens).loss.backward()
            with _CollectiveBytes() as step_bytes:
                optimizer.step()
                if hasattr(optimizer, "synchronize"):
                    optimizer.synchronize()
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                optimizer.step()
                if hasattr(optimizer, "synchronize"):
                    optimizer.synchronize()
                times.append(time.perf_counter() - start)
            results[name] = dict(
                state_bytes=dm.state_bytes(optimizer),
                optimizer_all_reduce_bytes=step_bytes.all_reduce,
                grad_reduce_scatter_bytes=backward_bytes.reduce_scatter,
                step_seconds=statistics.median(times),
                local_params=sum(p.to_local().numel() for p in model.parameters()),
            )
            del model, optimizer
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, args: argparse.Namespace, target=None) -> list[dict]:
    """Run ``target(rank, world_size, port, args, queue)`` (default: this benchmark's) on each rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target or _rank_main, args=(r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    while len(results) < world_size:
        rank, value = queue.get(timeout=args.rank_timeout)
        results[rank] = value
    for p in procs:
        p.join()
    return [results[r] for r in range(world_size)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated numbers of CPU ranks (default 2,4)")
    parser.add_argument("--seq-length", type=int, default=32, help="tokens in the one measured batch (default 32)")
    parser.add_argument("--rank-timeout", type=float, default=3600, help="seconds to wait for the ranks")


def run(args: argparse.Namespace) -> dict:
    report: dict[str, Any] = {}
    lines = [
        "GPT-2 small (124M) under FSDP2 on CPU/gloo; per rank (worst rank for bytes, median rank time)",
        f"{'ranks':>5} {'optimizer':<9} {'state MiB':>10} {'vs AdamW':>9} {'opt all_reduce':>15} "
        f"{'grad reduce-scatter':>20} {'extra comm':>10} {'step s':>8} {'vs AdamW':>9}",
    ]
    for world_size in [int(w) for w in args.world_sizes.split(",")]:
        per_rank = _spawn(world_size, args)
        summary = {}
        for name in OPTIMIZERS:
            ranks = [r[name] for r in per_rank]
            summary[name] = dict(
                state_bytes=max(r["state_bytes"] for r in ranks),
                optimizer_all_reduce_bytes=max(r["optimizer_all_reduce_bytes"] for r in ranks),
                grad_reduce_scatter_bytes=max(r["grad_reduce_scatter_bytes"] for r in ranks),
                step_seconds=statistics.median(r["step_seconds"] for r in ranks),
            )
        adamw = summary["AdamW"]
        for name, s in summary.items():
            s["extra_comm_fraction"] = s["optimizer_all_reduce_bytes"] / max(1, s["grad_reduce_scatter_bytes"])
            lines.append(
                f"{world_size:>5} {name:<9} {s['state_bytes'] / 2**20:>10.2f} "
                f"{s['state_bytes'] / adamw['state_bytes']:>8.1%} {s['optimizer_all_reduce_bytes']:>15,} "
                f"{s['grad_reduce_scatter_bytes']:>20,} {s['extra_comm_fraction']:>10.3%} "
                f"{s['step_seconds']:>8.3f} {s['step_seconds'] / adamw['step_seconds']:>8.2f}x"
            )
        report[str(world_size)] = summary
    lines.append("target: the optimizer's extra communication under 1% of the gradient reduce-scatter bytes")
    print("\n".join(lines))
    return report


register(
    Benchmark(
        name="sharded",
        summary="GPT-2 small under FSDP2 at 2 and 4 CPU ranks: per-rank state, optimizer vs reduce-scatter bytes, step time",
        run=run,
        add_arguments=add_arguments,
        defaults={"repeats": 3},
    )
)
