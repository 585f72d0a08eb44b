"""``memory``: optimizer-state MiB per optimizer and model, beside the SMMF paper's figures.

Shapes come from the meta device; the state is measured from real tensors: real fp32 parameters
of those shapes get random gradients, each optimizer takes one step, and
:func:`dist_memopt.state_bytes` counts the storage its state holds. Each optimizer is freed before
the next is built.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any, Sequence

import torch

from dist_memopt.bench.models import ModelShapes, materialize, model_shapes
from dist_memopt.bench.optimizers import OPTIMIZERS, build_optimizer, check_optimizer_names
from dist_memopt.bench.paper import MEMORY_MIB, SMMF_TARGET_MIB, format_figure
from dist_memopt.bench.registry import Benchmark, register
from dist_memopt.bench.report import format_table
from dist_memopt.memory import state_bytes

__all__ = ["DEFAULT_OPTIMIZERS", "measure_state_bytes", "memory_benchmark", "format_memory", "run"]

MIB = 2**20
DEFAULT_OPTIMIZERS = ("AdamW", "Adafactor", "Adafactor-b1", "CAME", "SM3", "SMMF", "Alada", "Alada-M-in-grad")


def measure_state_bytes(
    shapes: ModelShapes, optimizers: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, int]:
    """Bytes of state each optimizer holds after one step on real parameters of ``shapes``."""
    check_optimizer_names(optimizers)
    params = materialize(shapes, device)
    measured = {}
    for name in optimizers:
        optimizer = build_optimizer(name, params)
        if optimizer.defaults.get("momentum_in_grad"):
            optimizer.zero_grad()  # that mode's loop contract: zero_grad (M <- beta1*M in .grad) before each step
        optimizer.step()
        measured[name] = state_bytes(optimizer)
        del optimizer
        gc.collect()
    return measured


def _model_result(shapes: ModelShapes, measured: dict[str, int]) -> dict[str, Any]:
    paper = MEMORY_MIB.get(shapes.key, {})
    rows = {}
    for name, nbytes in measured.items():
        figure = paper.get(OPTIMIZERS[name].paper or "")
        rows[name] = {
            "bytes": nbytes,
            "mib": nbytes / MIB,
            "bits_per_param": nbytes * 8 / shapes.numel,
            "paper_mib": None if figure is None else list(figure.values),
            "paper_source": None if figure is None else figure.source,
        }
    result: dict[str, Any] = {
        "title": shapes.title,
        "numel": shapes.numel,
        "tensors": len(shapes.params),
        "tied": [list(pair) for pair in shapes.tied],
        "optimizers": rows,
        "verdicts": [],
    }
    target = SMMF_TARGET_MIB.get(shapes.key)
    if target is not None and "SMMF" in measured:
        ours = measured["SMMF"] / MIB
        result["verdicts"].append(
            {
                "check": f"SMMF state for {shapes.key} <= paper's {target.high:g} MiB ({target.source})",
                "measured": ours,
                "limit": target.high,
                "ok": ours <= target.high,
            }
        )
    return result


def memory_benchmark(models: Sequence[ModelShapes], optimizers: Sequence[str], echo: bool = False) -> dict[str, Any]:
    """Measure every optimizer on every model; with ``echo``, print each model's table as it is done."""
    results: dict[str, Any] = {"unit": "MiB = 2**20 bytes", "models": {}}
    for shapes in models:
        started = time.perf_counter()
        result = _model_result(shapes, measure_state_bytes(shapes, optimizers))
        result["seconds"] = time.perf_counter() - started
        results["models"][shapes.key] = result
        if echo:
            print(format_model(result), flush=True)
    results["verdicts"] = [v for r in results["models"].values() for v in r["verdicts"]]
    return results


def format_model(result: dict[str, Any]) -> str:
    tied = "; ".join(f"{alias} tied to {canonical}, counted once" for alias, canonical in result["tied"])
    header = f"{result['title']}: {result['numel']:,} parameters in {result['tensors']} tensors"
    lines = [header + (f" ({tied})" if tied else "")]
    rows = []
    for name, row in result["optimizers"].items():
        paper = "—"
        if row["paper_mib"] is not None:
            paper = format_figure(row["paper_mib"], row["paper_source"])
        rows.append([name, f"{row['mib']:.2f}", f"{row['bits_per_param']:.3f}", paper])
    lines.append(format_table(["optimizer", "state MiB", "bits/param", "paper MiB (source)"], rows))
    for verdict in result["verdicts"]:
        status = "OK" if verdict["ok"] else "OVER"
        lines.append(f"{status}: {verdict['check']}: measured {verdict['measured']:.2f} MiB")
    return "\n".join(lines) + "\n"


def format_memory(results: dict[str, Any]) -> str:
    """All models' tables, then how each optimizer row was built."""
    parts = [format_model(r) for r in results["models"].values()]
    parts.append(format_sources(next(iter(results["models"].values()))["optimizers"]))
    return "\n".join(parts)


NOTES = (
    "The paper fine-tunes GPT-2 and BERT on GLUE with a classification head (GPT-2: +1,536 parameters; BERT: "
    "pooler and classifier instead of the MLM transform and bias, -30,520); SMMF's state differs by < 0.05 MiB.",
    "The paper's Adafactor, SM3 and CAME keep a β1 = 0.9 first moment (Tables 19-23): 32 bits per parameter. "
    "torch.optim.Adafactor has none; Adafactor-b1 is the paper's configuration.",
    "The paper measured at 100 iterations on a GPU (how is not stated); ours count the tensors in optimizer.state.",
)


def format_sources(rows: dict[str, Any]) -> str:
    lines = ["Optimizers (paper columns: fine-tuning, 'optimizer memory at 100 iterations including S_M'):"]
    lines += [f"  {name}: {OPTIMIZERS[name].source}" for name in rows]
    lines += ["Notes:"] + [f"  - {note}" for note in NOTES]
    return "\n".join(lines)


def run(options: argparse.Namespace) -> dict[str, Any]:
    models = [model_shapes(key) for key in options.models]
    optimizers = check_optimizer_names(options.optimizers)
    results = memory_benchmark(models, optimizers, echo=True)
    print(format_sources(results["models"][models[0].key]["optimizers"]), flush=True)
    return results


register(
    Benchmark(
        name="memory",
        summary="optimizer-state MiB of AdamW, Adafactor, CAME, SM3, SMMF and Alada beside the SMMF paper's figures",
        run=run,
        defaults={"models": ["gpt2", "bert", "t5"], "optimizers": list(DEFAULT_OPTIMIZERS)},
    )
)
