"""``kernels``: per optimizer step, the kernels launched and the bytes read + written per element.

Counted, not timed (see :mod:`.counting`): every aten op of one ``optimizer.step()`` that would
launch a kernel on a GPU, and every Triton launch, with the bytes of their inputs and outputs,
divided by the parameter elements the step updates. Each optimizer first takes ``warmup`` steps
(state allocation, Alada's t = 0), then ``steps`` counted steps are averaged (Alada alternates
two kinds of steps). Single process, and FSDP2 on CPU ranks (``--world-sizes``).
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
from dist_memopt.bench.counting import count_step, prepare_triton
from dist_memopt.bench.models import DTYPES, materialize, model_shapes
from dist_memopt.bench.optimizers import build_optimizer
from dist_memopt.bench.registry import Benchmark, int_at_least, register
from dist_memopt.bench.report import format_table
from dist_memopt.kernels.select import triton_available

__all__ = ["DEFAULT_OPTIMIZERS", "count_step", "kernel_costs", "format_costs", "run"]

DEFAULT_OPTIMIZERS = (
    "AdamW", "AdamW-foreach", "SMMF", "SMMF-nocheck", "Alada", "Alada-nocheck",
    "SMMF-triton", "SMMF-triton-nocheck", "Alada-triton", "Alada-triton-nocheck",
)


def kernel_costs(
    model: str, optimizers: Sequence[str], warmup: int = 2, steps: int = 2, device: str = "cpu", execute: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """:func:`count_step` for every optimizer on parameters of ``model``'s shapes (one process).

    Optimizers whose name says ``triton`` are skipped where Triton is not installed.
    """
    prepare_triton(optimizers, torch.device(device))
    shapes = model_shapes(model)
    params = materialize(shapes, device, dtype=dtype)  # shared: counts do not depend on the values the others left
    rows = {}
    for name in optimizers:
        if "triton" in name and not triton_available():
            continue
        rows[name] = count_step(build_optimizer(name, params), shapes.numel, warmup, steps, execute=execute or device == "cuda")
    return {"title": shapes.title, "numel": shapes.numel, "optimizers": rows}


def format_costs(title: str, rows: dict[str, dict[str, Any]]) -> str:
    table = [
        [name, f"{r['launches']:g}", f"{r['bytes_per_element']:.1f}", f"{r['read_per_element']:.1f}", f"{r['syncs']:g}",
         "—" if r.get("host_ms") is None else f"{r['host_ms']:.1f}",
         ", ".join(f"{op} {n / len(r['launches_per_step']):g}" for op, n in list(r["top_ops"].items())[:4])]
        for name, r in rows.items()
    ]
    headers = ["optimizer", "launches/step", "B/elem r+w", "of which read", "host syncs", "host ms", "most launched"]
    return f"{title}\n{format_table(headers, table)}\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kernels")
    group.add_argument("--count-steps", type=int_at_least(1), default=2, help="counted steps per optimizer (default 2)")
    group.add_argument("--kernel-device", default="cpu", help="device of the one-process counts (default cpu)")
    group.add_argument(
        "--triton-execute", action="store_true", help="on CPU, run the Triton kernels in the interpreter (slow; needs TRITON_INTERPRET=1 in the environment) instead of counting only"
    )
    group.add_argument(
        "--kernel-dtype", choices=sorted(DTYPES), default="float32",
        help="parameter and gradient dtype of the one-process counts (default float32)",
    )
    group.add_argument(
        "--kernel-world-sizes", default="2", help="also count under FSDP2 at these CPU rank counts ('' for none; default 2)"
    )


def run(options: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"models": {}, "fsdp2": {}}
    prepare_triton(options.optimizers or DEFAULT_OPTIMIZERS, torch.device(options.kernel_device))  # the ranks inherit it
    for model in options.models:
        result = kernel_costs(
            model, options.optimizers or DEFAULT_OPTIMIZERS, steps=options.count_steps,
            device=options.kernel_device, execute=options.triton_execute, dtype=DTYPES[options.kernel_dtype],
        )
        results["models"][model] = result
        title = f"{result['title']}, one process, {result['numel']:,} {options.kernel_dtype} elements"
        print(format_costs(title, result["optimizers"]), flush=True)
    sizes = [int(w) for w in options.kernel_world_sizes.split(",") if w.strip()]
    if sizes:
        from dist_memopt.bench.kernels_fsdp import fsdp2_costs

        for world_size in sizes:
            rows = fsdp2_costs(world_size, options.optimizers or DEFAULT_OPTIMIZERS, options.count_steps)
            results["fsdp2"][str(world_size)] = rows
            print(format_costs(f"GPT-2 small under FSDP2, {world_size} CPU ranks (rank 0; per local element)", rows), flush=True)
    if options.kernel_device == "cpu" and not options.triton_execute:
        print("*-triton rows on CPU: launches recorded, kernels not run (--triton-execute interprets them). host ms: a step "
              "whose fused kernels are not run, timed on its own: the host's Python per step besides the launches (the "
              "*-triton rows with the check also compute its norms here, which a GPU queues).")
    print("launches: aten ops that run a kernel on a GPU (views and allocations excluded) plus Triton launches; "
          "a foreach op counts once. Bytes: each op's tensor inputs read and outputs written, per parameter element. "
          "The torch path is counted in the chunks it takes on a GPU (64M elements; 512K on CPU).")
    return results


register(
    Benchmark(
        name="kernels",
        summary="kernels launched and bytes read + written per element in one step (counted, not timed), GPT-2 small",
        run=run,
        add_arguments=add_arguments,
        defaults={"models": ["gpt2"], "optimizers": list(DEFAULT_OPTIMIZERS)},
    )
)
