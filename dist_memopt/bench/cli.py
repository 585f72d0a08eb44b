"""``python -m dist_memopt.bench <name> [options]``: run one registered benchmark, or ``all``.

Shared options: ``--models`` and ``--optimizers`` (comma-separated), ``--repeats`` and
``--json PATH``; a benchmark fills the ones not given from its own defaults. The exit status is 1
when a deterministic check fails (e.g. SMMF over the paper's memory figure), else 0; timing checks
(``"timing": true``) are printed but do not set it, because a shared machine makes them flaky.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from dist_memopt.bench.models import MODELS, parse_models
from dist_memopt.bench.optimizers import OPTIMIZERS, check_optimizer_names
from dist_memopt.bench.registry import benchmarks, int_at_least
from dist_memopt.bench.report import write_json

__all__ = ["build_parser", "main"]


def _models(text: str) -> list[str]:
    try:
        return parse_models(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _optimizers(text: str) -> list[str]:
    try:
        return check_optimizer_names(n.strip() for n in text.split(",") if n.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shared_options() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("shared options (defaults depend on the benchmark)")
    group.add_argument("--models", type=_models, help=f"comma-separated, from: {', '.join(MODELS)}")
    group.add_argument("--optimizers", type=_optimizers, help=f"comma-separated, from: {', '.join(OPTIMIZERS)}")
    group.add_argument("--repeats", type=int_at_least(1), help="timed repeats (benchmarks that time)")
    group.add_argument("--json", metavar="PATH", help="write {environment, benchmarks: {name: results}} here")
    return shared


def build_parser() -> argparse.ArgumentParser:
    known = benchmarks()
    shared = _shared_options()
    parser = argparse.ArgumentParser(
        prog="python -m dist_memopt.bench",
        description="Printed benchmarks of dist_memopt (numbers, not pass/fail tests).",
        epilog="Run `python -m dist_memopt.bench NAME --help` for a benchmark's options and defaults.",
    )
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", title="benchmarks", required=True)
    for bench in known.values():
        defaults = ", ".join(f"--{k} {v if not isinstance(v, list) else ','.join(map(str, v))}" for k, v in bench.defaults.items())
        child = sub.add_parser(
            bench.name, parents=[shared], help=bench.summary, description=f"{bench.summary}. Defaults: {defaults}."
        )
        if bench.add_arguments is not None:
            bench.add_arguments(child)
    # Options of the same name in two benchmarks must mean the same thing: the last one wins here.
    every = sub.add_parser(
        "all", parents=[shared], conflict_handler="resolve", help="run every registered benchmark in one run"
    )
    for bench in known.values():
        if bench.add_arguments is not None:
            bench.add_arguments(every)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    known = benchmarks()
    options = build_parser().parse_args(argv)
    names = list(known) if options.benchmark == "all" else [options.benchmark]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        bench = known[name]
        print(f"=== {name}: {bench.summary}\n", flush=True)
        results[name] = bench.run(bench.options_for(options))
        print(flush=True)
    if options.json:
        write_json(options.json, results)
        print(f"results written to {options.json}")
    verdicts = [v for r in results.values() for v in r.get("verdicts", [])]
    for verdict in verdicts:
        if not verdict["ok"]:
            kind = "timing check over target (exit status unaffected)" if verdict.get("timing") else "FAILED"
            print(f"{kind}: {verdict['check']}", file=sys.stderr)
    return 1 if any(not v["ok"] and not v.get("timing") for v in verdicts) else 0
