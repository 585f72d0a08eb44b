"""``step``: time per optimizer step of SMMF and Alada relative to ``AdamW(fused=True)``.

All optimizers step the same real parameters of a model's shapes with the same fixed random
gradients, interleaved (A B C A B C ...) so that machine noise hits them alike; each gets
``warmup`` untimed steps first (state allocation, Alada's first step). A sample is
:data:`STEPS_PER_SAMPLE` consecutive steps, reported per step: Alada's steps alternate between two
passes over the elements (odd t) and one (even t), and a sample of one step would time whichever
kind its round fell on. Reported: the median step time and the median over repeats of the paired
ratio t(optimizer) / t(AdamW) of the same repeat,
where AdamW is torch's fused one (what torch users, HF Trainer's default and ZeRO-Offload's
DeepSpeedCPUAdam give), with AdamW(foreach) and DeepSpeedCPUAdam beside it. On CPU the run also
measures the machine's memory bandwidth (an in-place add, once in each round) and counts each
optimizer's bytes moved per step (:class:`~dist_memopt.bench.counting.StepCost`): bytes over
the round's bandwidth is the physical limit of a step, and its share of the measured time says how
close an optimizer runs to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from dist_memopt.bench.models import DTYPES, ModelShapes, materialize, model_shapes
from dist_memopt.bench.optimizers import OPTIMIZERS, build_optimizer, check_optimizer_names
from dist_memopt.bench.paper import STEP_MS
from dist_memopt.bench.registry import Benchmark, int_at_least, register
from dist_memopt.bench.report import format_table, load_average

__all__ = ["DEFAULT_OPTIMIZERS", "BASELINES", "TARGETS", "STEPS_PER_SAMPLE", "BandwidthProbe", "step_bytes", "time_steps",
           "step_benchmark", "format_step", "run"]

DEFAULT_OPTIMIZERS = ("AdamW", "DeepSpeedCPUAdam", "AdamW-foreach", "SMMF", "SMMF-nocheck", "Alada", "Alada-nocheck",
                      "SMMF-torch", "Alada-torch")
BASELINES = ("Adafactor", "CAME", "SM3")
REFERENCE = "AdamW"
#: on CPU, GPT-2 small's shapes: the most each may take of a fused AdamW step (the fused CPU kernels
#: move about half of AdamW's bytes for SMMF, a little fewer for Alada's two passes and one-pass
#: even steps)
TARGETS = {"SMMF": 0.75, "SMMF-nocheck": 0.6, "Alada": 1.0}
TARGET_MODEL = "gpt2"
#: bytes an Adam step moves per element by its algorithm (weight, gradient, two moments read; weight
#: and moments written), for optimizers whose kernels cannot be counted (DeepSpeedCPUAdam's C++)
ADAM_BYTES_PER_ELEMENT = 28
#: consecutive steps per timed sample (an odd and an even one), reported per step
STEPS_PER_SAMPLE = 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.double().sum() for t in tensors]).cpu()


class BandwidthProbe:
    """Times an in-place add ``a += s·b`` of two 128 MiB arrays (two streams read, one written
    back): what an optimizer step can move at most, since a step writes only lines it has read.

    :func:`time_steps` runs it once per round beside the optimizers, so each step is compared
    with the memory's speed in its own round (a shared machine's memory speeds up and slows down
    within one run). A triad ``a = b + s·c`` into a third array also reads each line it writes
    (write-allocate), uncounted: on a 2-core EPYC it runs a third slower than this add, below
    the rate fused AdamW's step reaches.
    """

    def __init__(self, device: torch.device | str = "cpu", numel: int = 1 << 25) -> None:
        self.device = torch.device(device)
        self.a, self.b = (torch.rand(numel, device=self.device) for _ in range(2))
        self()  # faults the pages in

    def __call__(self) -> float:
        """Bytes per second of one add."""
        _synchronize(self.device)
        started = time.perf_counter()
        self.a.add_(self.b, alpha=1e-3)
        _synchronize(self.device)
        return 3 * self.a.numel() * self.a.element_size() / (time.perf_counter() - started)


def step_bytes(optimizer: torch.optim.Optimizer, name: str, numel: int) -> Optional[float]:
    """Bytes a step of ``optimizer`` moves, counted op by op and kernel by kernel
    (:class:`~dist_memopt.bench.counting.StepCost`): the mean of two consecutive steps, as Alada's
    odd and even steps differ; DeepSpeedCPUAdam's C++ step is Adam's stream."""
    if name == "DeepSpeedCPUAdam":
        return float(ADAM_BYTES_PER_ELEMENT * numel)
    from dist_memopt.bench.counting import StepCost

    steps = 2
    with StepCost(optimizer) as cost:
        for _ in range(steps):
            optimizer.step()
        if hasattr(optimizer, "synchronize"):
            optimizer.synchronize()
    return float(cost.bytes_read + cost.bytes_written) / steps


def time_steps(
    shapes: ModelShapes,
    optimizers: Sequence[str],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    moved: Optional[dict[str, Optional[float]]] = None,
    bandwidths: Optional[list[float]] = None,
) -> dict[str, list[float]]:
    """Seconds per ``step()`` of each optimizer, ``repeats`` samples each, interleaved: a sample is
    :data:`STEPS_PER_SAMPLE` consecutive steps, divided by their count.
    With ``moved``, each optimizer's bytes per step are counted into it after the timings; with
    ``bandwidths``, the memory's bytes per second in each round (:class:`BandwidthProbe`) are
    appended to it."""
    check_optimizer_names(optimizers)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    params = materialize(shapes, device, dtype=dtype)
    grads = [p.grad for p in params]
    before = _fingerprint(grads)
    built = {name: build_optimizer(name, params) for name in optimizers}
    for _ in range(warmup):
        for optimizer in built.values():
            optimizer.step()
    samples: dict[str, list[float]] = {name: [] for name in built}
    probe = None if bandwidths is None else BandwidthProbe(device)
    for _ in range(repeats):
        if probe is not None:
            bandwidths.append(probe())
        for name, optimizer in built.items():
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(STEPS_PER_SAMPLE):
                optimizer.step()
            _synchronize(device)
            samples[name].append((time.perf_counter() - started) / STEPS_PER_SAMPLE)
    del probe
    if moved is not None:
        for name, optimizer in built.items():
            moved[name] = step_bytes(optimizer, name, shapes.numel)
    if not torch.equal(before, _fingerprint(grads)) or any(p.grad is not g for p, g in zip(params, grads)):
        raise RuntimeError("an optimizer changed the shared gradients; the timings would not be comparable")
    return samples


def _summary(samples: dict[str, list[float]], moved: dict[str, Optional[float]], numel: int,
             bandwidths: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per optimizer: times, the paired ratio to AdamW(fused), and its bytes against the memory's
    speed in the same rounds (``fraction_of_limit``: median over rounds of limit / time)."""
    reference = samples.get(REFERENCE)
    rows = {}
    for name, times in samples.items():
        nbytes = moved.get(name)
        limit = fraction = None
        if nbytes is not None and bandwidths:
            limit = nbytes / statistics.median(bandwidths)
            fraction = statistics.median(nbytes / b / t for b, t in zip(bandwidths, times))
        paired = fastest = None
        if reference is not None:
            paired = statistics.median(t / r for t, r in zip(times, reference))
            fastest = min(times) / min(reference)
        rows[name] = {
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times),
            "samples_ms": [1e3 * t for t in times],
            "ratio_to_adamw": paired,
            "min_ratio_to_adamw": fastest,
            "bytes_per_element": None if nbytes is None else nbytes / max(1, numel),
            "limit_ms": None if limit is None else 1e3 * limit,
            "fraction_of_limit": fraction,
        }
    return rows


def step_benchmark(
    models: Sequence[ModelShapes],
    optimizers: Sequence[str],
    repeats: int,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    echo: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Time every optimizer on every model; with ``echo``, print each model's table when done."""
    device = torch.device(device)
    results: dict[str, Any] = {
        "device": str(device),
        **(_cpu_description() if device.type == "cpu" else {}),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "steps_per_sample": STEPS_PER_SAMPLE,
        "ratio": "ratio_to_adamw: median over repeats of t(optimizer)/t(AdamW(fused=True)) in the same repeat; "
        "min_ratio_to_adamw: fastest step / fastest AdamW step",
        "limit": "bandwidth: an in-place add's bytes per second, once per repeat beside the optimizers; limit_ms: bytes "
        "moved per step / median bandwidth; fraction_of_limit: median over repeats of (bytes / that repeat's bandwidth) / step time",
        "models": {},
        "verdicts": [],
    }
    for shapes in models:
        load_before = load_average()
        on_cpu = device.type == "cpu"
        moved: dict[str, Optional[float]] = {}
        bandwidths: list[float] = []
        samples = time_steps(shapes, optimizers, repeats, warmup, device, dtype, moved=moved if on_cpu else None,
                             bandwidths=bandwidths if on_cpu else None)
        rows = _summary(samples, moved, shapes.numel, bandwidths)
        result = {
            "title": shapes.title,
            "numel": shapes.numel,
            "load_average_1min": [load_before, load_average()],
            "bandwidth_gb_per_s": [b / 1e9 for b in bandwidths],
            "optimizers": rows,
        }
        results["models"][shapes.key] = result
        for name, limit in TARGETS.items():
            ratio = rows.get(name, {}).get("ratio_to_adamw")
            if device.type == "cpu" and shapes.key == TARGET_MODEL and ratio is not None:
                results["verdicts"].append(
                    {
                        "check": f"{OPTIMIZERS[name].source} step on {shapes.key} <= {limit}x AdamW(fused=True) on CPU",
                        "measured": ratio,
                        "limit": limit,
                        "ok": ratio <= limit,
                        "timing": True,
                    }
                )
        if echo:
            print(format_model(result, results), flush=True)
    return results


def bandwidth_range(gb_per_s: Sequence[float]) -> str:
    """"median GB/s (min–max)" of the rounds' bandwidths."""
    return f"{statistics.median(gb_per_s):.0f} GB/s ({min(gb_per_s):.0f}–{max(gb_per_s):.0f})"


def _cpu_description() -> dict[str, str]:
    """The processor a CPU run timed on and the blocks the fused CPU kernels compile to there."""
    from dist_memopt.kernels.cpu_build import processor_name, simd_level

    return {"processor": processor_name(), "cpu_kernels_simd": simd_level()}


def _processor(run: dict[str, Any]) -> str:
    """" (processor; CPU kernels: blocks)" where the run recorded them."""
    if "processor" not in run:
        return ""
    return f" ({run['processor']}; CPU kernels: {run.get('cpu_kernels_simd', '?')})"


def format_model(result: dict[str, Any], run: dict[str, Any]) -> str:
    header = (
        f"{result['title']}: {result['numel']:,} {run['dtype']} parameters; {run['device']}{_processor(run)}, {run['torch_threads']} threads, "
        f"{run['repeats']} interleaved repeats of {run.get('steps_per_sample', 1)} steps after {run['warmup']} warm-up steps"
    )
    rows = []
    for name, row in result["optimizers"].items():
        paired, fastest = (
            ("—", "—")
            if row["ratio_to_adamw"] is None
            else (f"{row['ratio_to_adamw']:.2f}x", f"{row['min_ratio_to_adamw']:.2f}x")
        )
        cost = ["—", "—", "—"]
        if row.get("bytes_per_element") is not None:
            cost[0] = f"{row['bytes_per_element']:.1f}"
        if row.get("limit_ms") is not None:
            cost[1:] = [f"{row['limit_ms']:.1f}", f"{row['fraction_of_limit']:.0%}"]
        rows.append([name, f"{row['median_ms']:.1f}", f"{row['min_ms']:.1f}–{row['max_ms']:.1f}", paired, fastest, *cost])
    headers = ["optimizer", "median ms", "min–max ms", "vs AdamW", "min vs min", "B/elem", "limit ms", "of limit"]
    lines = [header, format_table(headers, rows)]
    lines.append("vs AdamW: median over repeats of t/t(AdamW(fused=True)) in the same repeat (the targets' measure)")
    if result.get("bandwidth_gb_per_s"):
        lines.append(f"memory bandwidth (in-place add, each repeat): {bandwidth_range(result['bandwidth_gb_per_s'])}; "
                     "limit ms: bytes moved per step over the median; of limit: median over repeats of limit / step, "
                     "each with its repeat's bandwidth")
    loads = [x for x in result["load_average_1min"] if x is not None]
    cores = os.cpu_count() or 1
    if run["device"] == "cpu" and loads and max(loads) > cores:
        lines.append(
            f"WARNING: busy machine (load average {max(loads):.1f} on {cores} cores): each parallel op waits for "
            "preempted threads, which inflates SMMF's many chunk-sized ops most; rerun when idle or with --threads 1"
        )
    return "\n".join(lines) + "\n"


def format_paper() -> str:
    rows = []
    for model, times in STEP_MS.items():
        adam = times["Adam"][0]
        rows.append(
            [model]
            + [f"{mean:g}±{std:g}" for mean, std in times.values()]
            + [f"{times['SMMF'][0] / adam:.2f}x"]
        )
    headers = ["SMMF paper, Table 5 (GPU, ms)"] + list(next(iter(STEP_MS.values()))) + ["SMMF/Adam"]
    note = "(per training step on GPUs, SMMF with an 8-bit sign matrix: only the ratios compare)"
    return format_table(headers, rows) + "\n" + note + "\n"


def format_verdicts(results: dict[str, Any]) -> str:
    lines = []
    for verdict in results["verdicts"]:
        status = "OK" if verdict["ok"] else "OVER"
        lines.append(f"{status}: {verdict['check']}: measured {verdict['measured']:.2f}x")
    return "\n".join(lines)


def format_step(results: dict[str, Any]) -> str:
    parts = [format_model(r, results) for r in results["models"].values()]
    parts += [format_verdicts(results), format_paper()]
    return "\n".join(p for p in parts if p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("step")
    group.add_argument("--baselines", action="store_true", help=f"also time {', '.join(BASELINES)} (slower)")
    group.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed steps per optimizer first (default 2)")
    group.add_argument("--device", default="cpu", help="device for the step benchmark (default cpu)")
    group.add_argument("--step-dtype", choices=sorted(DTYPES), default="float32", help="parameter and gradient dtype (default float32)")
    group.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch CPU threads while timing (default: torch's own choice)"
    )


def run(options: argparse.Namespace) -> dict[str, Any]:
    optimizers = list(options.optimizers)
    if options.baselines:
        optimizers += [name for name in BASELINES if name not in optimizers]
    check_optimizer_names(optimizers)
    models = [model_shapes(key) for key in options.models]
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        results = step_benchmark(
            models, optimizers, options.repeats, options.warmup, options.device, echo=True, dtype=DTYPES[options.step_dtype]
        )
    finally:
        torch.set_num_threads(threads)
    print("\n".join(p for p in (format_verdicts(results), format_paper()) if p), flush=True)
    print("Optimizers: " + "; ".join(f"{n} = {OPTIMIZERS[n].source}" for n in optimizers), flush=True)
    return results


register(
    Benchmark(
        name="step",
        summary="time per optimizer step of SMMF and Alada relative to AdamW(fused=True) on GPT-2-small shapes, with bytes moved against the memory bandwidth",
        run=run,
        add_arguments=add_arguments,
        defaults={"models": ["gpt2"], "repeats": 10, "optimizers": list(DEFAULT_OPTIMIZERS)},
    )
)
