"""``python -m tools.compile_kernels``: the fused kernels compiled for GPUs on this machine, no GPU needed.

Steps SMMF and Alada with ``kernel="triton"`` on parameters of a model's shapes, in every setting
that changes what a kernel compiles to (first moment or not, weight-decay mode, momentum in
``.grad``, Alada's first, odd and even steps, fp32/bf16/fp16 parameters, a tensor-parallel
shard's strided runs, reported in rows of their own), inside
:func:`tools.kernel_compile.compile_for`: every launch is compiled for each ``sm_<arch>``
(Triton's pipeline down to a cubin) instead of run. Prints, per kernel, its specialisations and
what a GPU would run; checks that each compiles, uses no float atomics (whose order varies) and
spills nothing to local memory or fences its main loop, and what each element costs the GPU in
issued instructions (static counts of the main loop's SASS: the estimate where no GPU can time
it). Needs ``TRITON_INTERPRET`` unset. A development tool, run from a checkout's root::

    python -m tools.compile_kernels [--models gpt2] [--archs 80,90] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch

import dist_memopt as dm
from dist_memopt.bench.models import DTYPES, MODELS, materialize, model_shapes, parse_models
from dist_memopt.bench.report import format_table, write_json
from dist_memopt.kernels.select import triton_problem
from dist_memopt.shard.spec import Run, Segment, ShardSpec, set_layout

__all__ = ["VARIANTS", "compile_kernels", "run", "main"]

#: the settings that select different compiled code (constexpr branches), with kernel="triton"
VARIANTS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "SMMF": lambda p: dm.SMMF(p, kernel="triton", weight_decay=0.01),
    "SMMF beta=None": lambda p: dm.SMMF(p, kernel="triton", beta=None, weight_decay=0.01),
    "SMMF weight_decay_mode=adam": lambda p: dm.SMMF(p, kernel="triton", weight_decay_mode="adam", weight_decay=0.01),
    "Alada": lambda p: dm.Alada(p, kernel="triton", weight_decay=0.01),
    "Alada momentum_in_grad": lambda p: dm.Alada(p, kernel="triton", momentum_in_grad=True, weight_decay=0.01),
}
STEPS = 3  # Alada's first step, then an odd and an even one (each compiles its own statistics kernel)
#: the kernels whose main loop sweeps a tile's (TR × BC) element blocks: their cost per element
ELEMENT_KERNELS = ("_tile_kernel", "_stats_kernel", "_update_kernel")
#: the summary rows' mark for variants compiled for strided runs (tensor-parallel shards)
STRIDED = "(TP runs)"


def _step_variant(build: Callable[[list], torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> None:
    optimizer = build(params)
    for _ in range(STEPS):
        optimizer.zero_grad()  # Alada's momentum in .grad needs the optimizer's own zero_grad
        for p in params:
            g = torch.randn_like(p).mul_(1e-3)
            p.grad = g if p.grad is None else p.grad.add_(g)
        optimizer.step()


def tensor_parallel_block(dtype: torch.dtype, rows: int = 64, cols: int = 96, held: int = 40) -> torch.nn.Parameter:
    """Columns ``[8, 8 + held)`` of a ``(rows, cols)`` weight, as column-wise tensor parallelism leaves a
    rank's shard (declared, no process group: nothing runs). Its runs hold several pieces, so the
    kernels compile their ``RUNS`` index math, which no whole tensor (nor FSDP or ZeRO shard) reaches."""
    run = Run(8, held, cols, rows)
    param = torch.nn.Parameter(torch.zeros(rows * held, dtype=dtype))
    param.grad = torch.zeros_like(param)
    set_layout(param, [Segment(0, ShardSpec.of_runs((rows, cols), [run]))])
    return param


def compile_kernels(model: str, arch: int, dtypes: list[str], variants: list[str]) -> list[Any]:
    """Every distinct kernel specialisation the variants' steps launch, compiled for ``sm_<arch>``:
    on the model's parameters and on a tensor-parallel block (:func:`tensor_parallel_block`).

    The variants of one dtype share parameters: nothing runs, so their values do not matter."""
    from tools.kernel_compile import compile_for

    shapes = model_shapes(model)
    with compile_for(arch) as records:
        for dtype in dtypes:
            params = materialize(shapes, dtype=DTYPES[dtype]) + [tensor_parallel_block(DTYPES[dtype])]
            for name in variants:
                _step_variant(VARIANTS[name], params)
    return records


def _row_name(record: Any) -> str:
    """The summary row of a record: its kernel, apart for the strided (tensor-parallel) index math."""
    return f"{record.kernel} {STRIDED}" if record.constants.get("RUNS") else record.kernel


def _loop_costs(record: Any) -> dict[str, Any]:
    """What one trip of the record's main loop issues: instructions per element (element kernels),
    subroutine calls and memory fences; and how many of its warps an SM holds."""
    from tools.kernel_compile import main_loop, resident_warps

    loop = main_loop(record.sass)
    c = record.constants
    per_element = None
    if loop and record.kernel in ELEMENT_KERNELS:
        per_element = loop.instructions / (c["TR"] * c["BC"] / (32 * record.num_warps))
    return {"per_element": per_element, "calls": loop.calls if loop else 0, "fences": loop.fences if loop else 0,
            "warps": resident_warps(record.resources.get("REG", 0), record.num_warps, record.shared_bytes, record.arch)}


def summarize(records: list[Any]) -> dict[str, dict[str, Any]]:
    """Per kernel: how many specialisations, the worst registers / local bytes / shared bytes /
    main-loop cost and the fewest resident warps over them, atomics."""
    by_kernel: dict[str, list[Any]] = defaultdict(list)
    for record in records:
        by_kernel[_row_name(record)].append(record)
    summary = {}
    for kernel, group in sorted(by_kernel.items()):
        ok = [r for r in group if r.error is None]
        loops = [_loop_costs(r) for r in ok if r.sass]
        per_element = [c["per_element"] for c in loops if c["per_element"] is not None]
        summary[kernel] = {
            "specializations": len(group),
            "errors": [r.error.splitlines()[0] for r in group if r.error],
            "max_registers": max((r.resources.get("REG", 0) for r in ok), default=0),
            "max_local_bytes": max((r.resources.get("LOCAL", 0) + r.resources.get("STACK", 0) for r in ok), default=0),
            "max_shared_bytes": max((r.shared_bytes for r in ok), default=0),
            "num_warps": sorted({r.num_warps for r in ok}),
            "atomics": sorted({a for r in ok for a in r.atomics}),
            "float_atomics": sorted({a for r in ok for a in r.float_atomics}),
            "max_fp64_instructions": max((r.fp64_instructions for r in ok), default=0),
            "max_loop_instructions_per_element": round(max(per_element), 1) if per_element else None,
            "max_loop_calls": max((c["calls"] for c in loops), default=0),
            "max_loop_fences": max((c["fences"] for c in loops), default=0),
            "min_resident_warps": min((c["warps"] for c in loops if c["warps"] is not None), default=None),
            "compile_seconds": round(sum(r.seconds for r in ok), 1),
        }
    return summary


def _table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [
        [k, s["specializations"], len(s["errors"]), s["max_registers"], s["max_local_bytes"], s["max_shared_bytes"],
         ",".join(map(str, s["num_warps"])), s["min_resident_warps"] or "-", s["max_loop_instructions_per_element"] or "-",
         s["max_loop_calls"], s["max_loop_fences"], " ".join(s["atomics"]) or "-", s["max_fp64_instructions"], s["compile_seconds"]]
        for k, s in summary.items()
    ]
    headers = ["kernel", "variants", "errors", "regs/thread", "local B", "shared B", "warps", "warps/SM", "loop instr/elem",
               "loop calls", "loop fences", "atomics", "fp64 instr", "compile s"]
    return format_table(headers, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compile")
    group.add_argument("--archs", default="80,90", help="CUDA compute capabilities to compile for, e.g. 80 (A100), 90 (H100/H200); default 80,90")
    group.add_argument("--compile-dtypes", default="float32,bfloat16,float16", help="parameter dtypes (default all three)")
    group.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")


def run(options: argparse.Namespace) -> dict[str, Any]:
    problem = triton_problem()
    if problem is not None:
        print(f"compile: skipped, {problem}")
        return {"archs": {}, "verdicts": []}
    archs = [int(a) for a in options.archs.split(",") if a.strip()]
    dtypes = [d.strip() for d in options.compile_dtypes.split(",") if d.strip()]
    variants = [v.strip() for v in options.variants.split(",") if v.strip()]
    unknown = [d for d in dtypes if d not in DTYPES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"compile: unknown dtype(s) or variant(s) {unknown} (dtypes: {', '.join(DTYPES)}; variants: {', '.join(VARIANTS)})")
    results: dict[str, Any] = {"archs": {}, "verdicts": []}
    for model in options.models:
        for arch in archs:
            summary = summarize(compile_kernels(model, arch, dtypes, variants))
            results["archs"][f"{model}/sm_{arch}"] = summary
            print(f"{MODELS[model][0]}: kernels compiled for sm_{arch} ({', '.join(dtypes)}; {len(variants)} settings)")
            print(_table(summary) + "\n", flush=True)
            for kernel, s in summary.items():
                for error in s["errors"][:3]:
                    print(f"  {kernel}: {error}")
            where = f"on {model} for sm_{arch}"
            results["verdicts"] += [
                {"check": f"every Triton launch compiles {where}", "ok": not any(s["errors"] for s in summary.values())},
                {"check": f"no float atomics {where} (bit-identical reruns)", "ok": not any(s["float_atomics"] for s in summary.values())},
                {"check": f"no local memory (register spills) {where}", "ok": all(s["max_local_bytes"] == 0 for s in summary.values())},
                {"check": f"no memory fences in a main loop (relaxed atomics) {where}", "ok": all(s["max_loop_fences"] == 0 for s in summary.values())},
            ]
    print("variants: distinct compiled variants (dtypes, constexpr settings, the two column blocks); regs/thread, "
          "local (spilled) and shared bytes: the worst over them, read from each cubin by cuobjdump. warps/SM: the fewest "
          "an SM holds at once (of 64; registers and shared memory bound it). loop: the main loop's SASS, statically: "
          "instructions per element per thread, subroutine calls (a 64-bit division: only strides under a column block divide per element) and memory "
          "fences. Nothing ran.")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Compile, print the tables, write ``--json``; exit status 1 when a check fails."""
    parser = argparse.ArgumentParser(prog="python -m tools.compile_kernels", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--models", type=parse_models, default=["gpt2"], help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--json", metavar="PATH", help="write {environment, benchmarks: {compile: results}} here")
    add_arguments(parser)
    options = parser.parse_args(argv)
    results = run(options)
    if options.json:
        write_json(options.json, {"compile": results})
    failed = [v["check"] for v in results["verdicts"] if not v["ok"]]
    for check in failed:
        print(f"FAILED: {check}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
