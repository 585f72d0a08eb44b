"""MkDocs hook: a page's ``<!-- results: NAME -->`` line becomes tables read from ``docs/results/NAME.json``.

The result files are what ``python -m dist_memopt.bench NAME --json docs/results/NAME.json``
writes: the environment (date, machine, threads, torch, the command) and each benchmark's
results. Rendering them at build time keeps every published number beside the run that produced
it; a missing file renders as a note saying which command writes it.

A file named for a variant of a benchmark (``deepspeed_offload.json``: ``bench deepspeed
--ds-offload``) holds that one benchmark's results and renders as it does.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any, Callable

MARKER = re.compile(r"^<!-- results: ([\w-]+) -->$", re.MULTILINE)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _memory(results: dict[str, Any]) -> str:
    parts = []
    for model in results["models"].values():
        rows = []
        for name, row in model["optimizers"].items():
            paper = row.get("paper_mib")
            span = (f"{min(paper)}" if min(paper) == max(paper) else f"{min(paper)}–{max(paper)}") if paper else ""
            paper_text = f"{span} ({row['paper_source']})" if paper else "—"
            rows.append([name, _number(row["mib"]), _number(row["bits_per_param"], 3), paper_text])
        parts.append(f"**{model['title']}**, {model['numel']:,} parameters\n\n"
                     + _table(["optimizer", "state MiB", "bits/param", "SMMF paper MiB"], rows))
    return "\n\n".join(parts)


def _cost_rows(optimizers: dict[str, Any]) -> list[list[Any]]:
    return [[name, _number(row["launches"], 0), _number(row["bytes_per_element"], 1), _number(row["syncs"], 0), _number(row.get("host_ms"), 1)]
            for name, row in optimizers.items()]


def _kernels(results: dict[str, Any]) -> str:
    headers = ["optimizer", "launches / step", "bytes read + written / element", "host syncs / step", "host ms / step (dry run)"]
    parts = [f"**{model['title']}**, one process\n\n" + _table(headers, _cost_rows(model["optimizers"]))
             for model in results.get("models", {}).values()]
    parts += [f"**GPT-2 small under FSDP2, {size} CPU ranks** (rank 0, per local element)\n\n" + _table(headers, _cost_rows(rows))
              for size, rows in results.get("fsdp2", {}).items()]
    return "\n\n".join(parts)


def _ratio(value: Any) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _step(results: dict[str, Any]) -> str:
    headers = ["optimizer", "median ms", "× AdamW(fused)", "bytes / element", "limit ms", "of limit"]
    parts = []
    for model in results["models"].values():
        rows = [[name, _number(row["median_ms"], 1), _ratio(row["ratio_to_adamw"]), _number(row.get("bytes_per_element"), 1),
                 _number(row.get("limit_ms"), 1),
                 "—" if row.get("fraction_of_limit") is None else f"{row['fraction_of_limit']:.0%}"]
                for name, row in model["optimizers"].items()]
        bandwidth = model.get("bandwidth_gb_per_s") or []
        note = ""
        if bandwidth:
            middle = statistics.median(bandwidth)
            note = f"; memory bandwidth (in-place add, each repeat) {middle:.0f} GB/s ({min(bandwidth):.0f}–{max(bandwidth):.0f})"
        parts.append(f"**{model['title']}**, {model['numel']:,} {results['dtype']} parameters, {results['torch_threads']} threads, "
                     f"{results['repeats']} interleaved repeats{_of_steps(results)}{note}\n\n" + _table(headers, rows))
    verdicts = [f"- {'met' if v['ok'] else 'missed'}: {v['check']} (measured {v['measured']:.2f}×)" for v in results.get("verdicts", [])]
    return "\n\n".join(parts + (["\n".join(verdicts)] if verdicts else []))


def _deepspeed(results: dict[str, Any]) -> str:
    headers = ["ZeRO stage", "optimizer", "class", "state MiB per rank", "bytes / param", "step ms", "× AdamW", "CPU ms", "× AdamW (CPU)"]
    rows = [[c["stage"], c["optimizer"], c.get("implementation", "—"), " / ".join(f"{b / 2**20:,.1f}" for b in c["state_bytes_per_rank"]),
             _number(c["bits_per_param"] / 8, 3), _number(c["step_seconds"] * 1e3, 0), _ratio(c["step_vs_adamw"]),
             _number(c["step_cpu_seconds"] * 1e3, 0), _ratio(c["step_cpu_vs_adamw"])] for c in results["configurations"]]
    first = results["configurations"][0]
    offload = ' with `"offload_optimizer": {"device": "cpu"}`' if results.get("offload") else ""
    return (f"**{results['model_title']}**, {first['numel']:,} parameters, {results['ranks']} CPU ranks (gloo, 1 thread each){offload}; "
            f"median `engine.step()` of {results['repeats']} samples{_of_steps(results)} after {results['warmup']} warm-up steps, slowest rank\n\n"
            + _table(headers, rows))


def _of_steps(results: dict[str, Any]) -> str:
    """How many consecutive steps a sample took, where the run says (each sample's time is per step)."""
    steps = results.get("steps_per_sample")
    return f" of {steps} consecutive steps each" if steps else ""


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {"memory": _memory, "kernels": _kernels, "step": _step, "deepspeed": _deepspeed}


def _environment(env: dict[str, Any]) -> str:
    command = " ".join(["python -m dist_memopt.bench"] + [str(a) for a in env.get("argv", [])[1:]])
    processor = f" ({env['processor']}; CPU kernels: {env.get('cpu_kernels_simd')})" if env.get("processor") else ""
    device = env.get("cuda") or f"{env.get('machine')} CPU{processor}, {env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads"
    return (f"Measured {env.get('finished')} on {device}; torch {env.get('torch')}, dist_memopt {env.get('dist_memopt')}, "
            f"load average {_number(env.get('load_average_1min'))}. Command: `{command}`")


def render(name: str, folder: Path) -> str:
    """The markdown for ``<!-- results: name -->``."""
    path = folder / f"{name}.json"
    if not path.exists():
        return (f'!!! note "No result file yet"\n    `python -m dist_memopt.bench {name} --json docs/results/{name}.json` '
                "writes it.")
    data = json.loads(path.read_text())
    benchmarks = data["benchmarks"]
    key = name if name in benchmarks else next(iter(benchmarks))  # a file named for a variant holds one benchmark
    body = RENDERERS[key](benchmarks[key]) if key in RENDERERS else f"See `docs/results/{name}.json`."
    return _environment(data["environment"]) + "\n\n" + body


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    folder = Path(config["docs_dir"]) / "results"
    return MARKER.sub(lambda match: render(match.group(1), folder), markdown)
