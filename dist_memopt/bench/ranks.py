"""What the multi-process benchmarks share: spawning CPU ranks, counting collective bytes, the optimizers."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from dist_memopt.bench.step import STEPS_PER_SAMPLE

__all__ = ["OPTIMIZERS", "CollectiveBytes", "make_optimizer", "spawn_ranks", "timed_step", "interleaved_steps"]

OPTIMIZERS = ("AdamW", "AdamW-foreach", "SMMF", "Alada")


class CollectiveBytes:
    """Counts input bytes of all_reduce and reduce-scatter calls (they still run)."""

    def __init__(self) -> None:
        self.all_reduce = 0
        self.reduce_scatter = 0
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> "CollectiveBytes":
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


def make_optimizer(name: str, params):
    import dist_memopt as dm

    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name == "AdamW-foreach":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return getattr(dm, name)(params, lr=1e-4)


def spawn_ranks(target, world_size: int, args: argparse.Namespace) -> list[dict]:
    """Run ``target(rank, world_size, port, args, queue)`` on ``world_size`` processes; their results."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    while len(results) < world_size:
        rank, value = queue.get(timeout=args.rank_timeout)
        results[rank] = value
    for p in procs:
        p.join()
    return [results[r] for r in range(world_size)]


def _one_step(optimizer: torch.optim.Optimizer) -> float:
    """Seconds per step of :data:`~dist_memopt.bench.step.STEPS_PER_SAMPLE` consecutive steps
    (Alada's alternate between two passes and one), started together on every rank and ended when
    every rank has finished them (barriers), a reduction the optimizer leaves in flight included:
    what a data-parallel loop pays before its next collective, for an optimizer that communicates
    or one that does not."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(STEPS_PER_SAMPLE):
        optimizer.step()
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()
    dist.barrier()
    return (time.perf_counter() - start) / STEPS_PER_SAMPLE


def interleaved_steps(optimizers: dict[str, torch.optim.Optimizer], repeats: int, baseline: str = "AdamW") -> dict[str, dict[str, float]]:
    """Per optimizer: the median step seconds and the median over ``repeats`` rounds of its time
    over ``baseline``'s in the same round (every optimizer takes its sample's steps in turn), so that
    a slow stretch of a shared machine weighs on both sides of a ratio, as in ``bench step``."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            times[name].append(_one_step(optimizer))
    return {
        name: dict(
            step_seconds=statistics.median(samples),
            vs_baseline=statistics.median(t / b for t, b in zip(samples, times[baseline])),
        )
        for name, samples in times.items()
    }


def timed_step(optimizer: torch.optim.Optimizer, repeats: int) -> float:
    """Median seconds per step of ``repeats`` samples (see :func:`_one_step`)."""
    return statistics.median(_one_step(optimizer) for _ in range(repeats))
