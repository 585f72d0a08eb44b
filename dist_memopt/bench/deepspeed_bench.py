"""``deepspeed``: per-rank optimizer state and step time of SMMF / Alada against DeepSpeed's AdamW.

A GPT-2-small-shaped model (transformers ``GPT2LMHeadModel(GPT2Config())``, random weights, nothing
downloaded) trains under real DeepSpeed engines at ZeRO stages 1, 2 and 3 on ``--ds-ranks`` CPU
ranks (gloo, one thread each), the optimizer chosen by name in ds_config. AdamW is what DeepSpeed
gives a user there: without offload ``"type": "AdamW"`` with ``"torch_adam": true, "fused": true``
(``torch.optim.AdamW(fused=True)``; DeepSpeed's FusedAdam needs CUDA); with ``--ds-offload``
(ZeRO-Offload, ``"offload_optimizer": {"device": "cpu"}``) plain ``"type": "AdamW"``, for which
DeepSpeed builds DeepSpeedCPUAdam. Per configuration: ``dist_memopt.state_bytes`` of the
optimizer DeepSpeed steps on each rank (its partition's state), and the median time of
``engine.step()`` (ZeRO's unscale/clip, the optimizer on the partition, the parameter all-gather)
after ``warmup`` untimed steps, in wall-clock and in process CPU time (on a shared machine the
latter is the steadier comparison), the slowest rank's median reported. A sample is the mean of
:data:`~dist_memopt.bench.step.STEPS_PER_SAMPLE` consecutive steps (Alada's alternate between two
passes over the elements and one), the backward between them not timed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import statistics
import time
from typing import Any, Optional

import torch

from dist_memopt.bench.registry import Benchmark, register
from dist_memopt.bench.step import STEPS_PER_SAMPLE

__all__ = ["DEFAULT_OPTIMIZERS", "OPTIMIZER_CONFIGS", "add_arguments", "run", "format_results"]

#: ds_config "optimizer" entries by benchmark name
OPTIMIZER_CONFIGS: dict[str, dict[str, Any]] = {
    "AdamW": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True, "fused": True}},
    "SMMF": {"type": "SMMF", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    "Alada": {"type": "Alada", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    "SMMF-nocheck": {"type": "SMMF", "params": {"lr": 1e-4, "weight_decay": 0.01, "check_finite": False}},
    "Alada-nocheck": {"type": "Alada", "params": {"lr": 1e-4, "weight_decay": 0.01, "check_finite": False}},
}
#: under ZeRO-Offload: DeepSpeed builds DeepSpeedCPUAdam for "type": "AdamW" without "torch_adam"
OFFLOAD_ADAMW = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}
DEFAULT_OPTIMIZERS = ("AdamW", "SMMF", "Alada")
REFERENCE = "AdamW"
MODELS = {"gpt2": "GPT-2 small (GPT2LMHeadModel, GPT2Config() defaults)", "tiny": "tiny GPT-2 (2 layers, width 32)"}
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds-stages", default="1,2,3", help="comma-separated ZeRO stages (default 1,2,3)")
    parser.add_argument("--ds-ranks", type=int, default=2, help="data-parallel CPU ranks (default 2)")
    parser.add_argument("--ds-warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    parser.add_argument("--ds-seq", type=int, default=32, help="tokens per rank per step (default 32)")
    parser.add_argument(
        "--ds-offload",
        action="store_true",
        help='ZeRO-Offload: "offload_optimizer": {"device": "cpu"} (AdamW is then DeepSpeedCPUAdam; stages 1-3)',
    )


def _build_model(key: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    if key == "gpt2":
        return GPT2LMHeadModel(GPT2Config())
    if key == "tiny":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=101))
    raise ValueError(f"unknown model {key!r}; known: {', '.join(MODELS)}")


def _rank_main(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs on every rank: each (stage, optimizer) engine in turn, timed steps, state bytes."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)  # the ranks share the machine's cores
    import deepspeed
    import torch.distributed as dist

    import dist_memopt.integrations.deepspeed  # noqa: F401  (SMMF / Alada by name)
    from dist_memopt.memory import state_bytes

    deepspeed.utils.logger.setLevel(logging.WARNING)
    rank = int(os.environ["RANK"])
    rows = []
    for stage in plan["stages"]:
        for name in plan["optimizers"]:
            torch.manual_seed(0)
            model = _build_model(plan["model"])
            numel = sum(p.numel() for p in model.parameters())
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage, name, plan["offload"]))
            generator = torch.Generator().manual_seed(rank)
            ids = torch.randint(0, model.config.vocab_size, (1, plan["seq"]), generator=generator)
            seconds, cpu_seconds = [], []
            for step in range(plan["warmup"] + STEPS_PER_SAMPLE * plan["repeats"]):
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                dist.barrier()
                started, cpu_started = time.perf_counter(), time.process_time()
                engine.step()
                if step >= plan["warmup"]:
                    if (step - plan["warmup"]) % STEPS_PER_SAMPLE == 0:
                        seconds.append(0.0)
                        cpu_seconds.append(0.0)
                    seconds[-1] += (time.perf_counter() - started) / STEPS_PER_SAMPLE
                    cpu_seconds[-1] += (time.process_time() - cpu_started) / STEPS_PER_SAMPLE
            rows.append(
                {
                    "stage": stage,
                    "optimizer": name,
                    "numel": numel,
                    "implementation": type(engine.basic_optimizer).__name__,
                    "state_bytes": state_bytes(engine.basic_optimizer),
                    "step_seconds": statistics.median(seconds),
                    "step_cpu_seconds": statistics.median(cpu_seconds),
                }
            )
            engine.destroy()
            del engine, model
            gc.collect()
            if rank == 0:
                print(f"  ZeRO-{stage} {name}: {rows[-1]['step_seconds'] * 1e3:.0f} ms", flush=True)
    return rows


def _config(stage: int, name: str, offload: bool) -> dict[str, Any]:
    # buckets of 5e7 elements (DeepSpeed's default 5e8 is 2 GB per fp32 bucket on CPU)
    zero = {"stage": stage, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "optimizer": OFFLOAD_ADAMW if offload and name == REFERENCE else OPTIMIZER_CONFIGS[name],
        "steps_per_print": 10**9,
    }


def _launch(plan: dict[str, Any], ranks: int) -> dict[int, list[dict[str, Any]]]:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=ranks,
        run_id=f"dist-memopt-deepspeed-bench-{port}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        monitor_interval=1,
        start_method="spawn",
    )
    from dist_memopt.train.distributed import remove_deepspeed_shm_buffers

    started = time.time()
    try:
        return elastic_launch(config, _rank_main)(plan)
    finally:
        remove_deepspeed_shm_buffers(since=started)


def _combine(per_rank: dict[int, list[dict[str, Any]]], ranks: int) -> dict[str, Any]:
    """Per configuration: each rank's state bytes, the slowest rank's median step, × AdamW."""
    results: dict[str, Any] = {"ranks": ranks, "configurations": []}
    for rows in zip(*(per_rank[r] for r in sorted(per_rank))):
        first = rows[0]
        results["configurations"].append(
            {
                "stage": first["stage"],
                "optimizer": first["optimizer"],
                "implementation": first["implementation"],
                "numel": first["numel"],
                "state_bytes_per_rank": [row["state_bytes"] for row in rows],
                "step_seconds": max(row["step_seconds"] for row in rows),
                "step_cpu_seconds": max(row["step_cpu_seconds"] for row in rows),
            }
        )
    for key in ("step_seconds", "step_cpu_seconds"):
        reference = {c["stage"]: c[key] for c in results["configurations"] if c["optimizer"] == REFERENCE}
        for c in results["configurations"]:
            c[key.replace("seconds", "vs_adamw")] = c[key] / reference[c["stage"]] if c["stage"] in reference else None
    for c in results["configurations"]:
        c["bits_per_param"] = max(c["state_bytes_per_rank"]) * 8 / (c["numel"] / ranks)
        c["bytes_per_param"] = c["bits_per_param"] / 8
    return results


def format_results(results: dict[str, Any]) -> str:
    def ratio(value: Optional[float]) -> str:
        return "—" if value is None else f"{value:.2f}"

    from_table = []
    for c in results["configurations"]:
        from_table.append(
            [
                f"ZeRO-{c['stage']}",
                c["optimizer"],
                c["implementation"],
                " / ".join(f"{b / MIB:.2f}" for b in c["state_bytes_per_rank"]),
                f"{c['bits_per_param']:.2f}",
                f"{c['step_seconds'] * 1e3:.0f}",
                ratio(c["step_vs_adamw"]),
                f"{c['step_cpu_seconds'] * 1e3:.0f}",
                ratio(c["step_cpu_vs_adamw"]),
            ]
        )
    headers = ["stage", "optimizer", "class", "state MiB per rank", "bits/param", "step ms", f"× {REFERENCE}", "CPU ms", f"× {REFERENCE} (CPU)"]
    cells = [headers] + from_table
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(str(v).ljust(w) if i < 3 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = results["configurations"][0]
    title = (
        f"DeepSpeed ZeRO{'-Offload' if results.get('offload') else ''} on CPU: {results['model_title']}, {first['numel']:,} parameters, {results['ranks']} ranks "
        f"(gloo, 1 thread each); median engine.step() of {results['repeats']} samples of {results.get('steps_per_sample', 1)} steps after {results['warmup']} warm-up, slowest rank"
    )
    note = (
        "bits/param: the largest rank's optimizer state over its 1/ranks share of the parameters. CPU ms: "
        "process CPU time of the same step (robust to other load on a shared machine, excludes waiting)."
    )
    return "\n".join([title, *lines, note])


def run(options: argparse.Namespace) -> dict[str, Any]:
    """Benchmark entry: ``options`` has models, optimizers, repeats and the ``--ds-*`` options."""
    model = (getattr(options, "models", None) or ["gpt2"])[0]
    optimizers = list(getattr(options, "optimizers", None) or DEFAULT_OPTIMIZERS)
    unknown = [name for name in optimizers if name not in OPTIMIZER_CONFIGS]
    if unknown or model not in MODELS:
        raise ValueError(f"deepspeed benchmark: unknown {unknown or model!r}; optimizers: {', '.join(OPTIMIZER_CONFIGS)}; models: {', '.join(MODELS)}")
    if REFERENCE not in optimizers:
        optimizers.insert(0, REFERENCE)
    stages = [int(s) for s in str(getattr(options, "ds_stages", "1,2,3")).split(",") if s.strip()]
    ranks = getattr(options, "ds_ranks", 2)
    plan = {
        "model": model,
        "optimizers": optimizers,
        "stages": stages,
        "repeats": getattr(options, "repeats", None) or 5,
        "warmup": getattr(options, "ds_warmup", 2),
        "seq": getattr(options, "ds_seq", 32),
        "offload": bool(getattr(options, "ds_offload", False)),
    }
    results = _combine(_launch(plan, ranks), ranks)
    results.update(model=model, model_title=MODELS[model], repeats=plan["repeats"], warmup=plan["warmup"], offload=plan["offload"],
                   steps_per_sample=STEPS_PER_SAMPLE)
    print(format_results(results), flush=True)
    return results


register(
    Benchmark(
        name="deepspeed",
        summary="per-rank optimizer state and engine.step() time vs DeepSpeed's AdamW at ZeRO-1/2/3, 2 CPU ranks",
        run=run,
        add_arguments=add_arguments,
        defaults={"models": ["gpt2"], "optimizers": list(DEFAULT_OPTIMIZERS), "repeats": 5},
    )
)
