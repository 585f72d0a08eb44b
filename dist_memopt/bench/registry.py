"""The benchmark registry: one entry per ``python -m dist_memopt.bench <name>``.

A benchmark is a name, a one-line summary, an optional hook that adds its own command-line
options, defaults for the shared options (``--models``, ``--repeats``, ``--optimizers``) and a ``run`` function
that prints its tables and returns a JSON-able dict. Later benchmarks (sharded, deepspeed,
quality) register themselves the same way and are listed in :data:`BUILTIN_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = [
    "Benchmark",
    "register",
    "get_benchmark",
    "benchmarks",
    "load_builtin_benchmarks",
    "BUILTIN_MODULES",
    "int_at_least",
]

#: modules imported by the CLI; each calls :func:`register` at import time
BUILTIN_MODULES: tuple[str, ...] = (
    "dist_memopt.bench.memory",
    "dist_memopt.bench.step",
    "dist_memopt.bench.kernels",
    "dist_memopt.bench.sharded",
    "dist_memopt.bench.deepspeed_bench",
    "dist_memopt.bench.quality",
)

#: shared options every benchmark receives (None when the user did not give them)
SHARED_OPTIONS = ("models", "repeats", "optimizers")


@dataclass(frozen=True)
class Benchmark:
    """What the CLI needs to offer and run one benchmark.

    ``run(options)`` receives the parsed options with the shared ones filled from ``defaults``
    and returns the results written under ``benchmarks.<name>`` by ``--json``.
    ``add_arguments(parser)`` may add options; their names must not clash with other benchmarks'
    (``all`` offers every benchmark's options at once).
    """

    name: str
    summary: str
    run: Callable[[argparse.Namespace], dict[str, Any]]
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def options_for(self, options: argparse.Namespace) -> argparse.Namespace:
        """``options`` with every shared option this run left unset taken from ``defaults``."""
        filled = argparse.Namespace(**vars(options))
        for key in SHARED_OPTIONS:
            if getattr(filled, key, None) is None:
                setattr(filled, key, self.defaults.get(key))
        return filled


_REGISTRY: dict[str, Benchmark] = {}


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``low`` (a clear usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def register(benchmark: Benchmark) -> Benchmark:
    """Add ``benchmark``; a second benchmark under the same name is an error."""
    if benchmark.name == "all":
        raise ValueError("'all' is reserved: it runs every registered benchmark")
    existing = _REGISTRY.get(benchmark.name)
    if existing is not None and existing.run is not benchmark.run:
        raise ValueError(f"a benchmark named {benchmark.name!r} is already registered")
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def load_builtin_benchmarks() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def benchmarks() -> dict[str, Benchmark]:
    """Registered benchmarks by name, in registration order."""
    load_builtin_benchmarks()
    return dict(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    known = benchmarks()
    if name not in known:
        raise KeyError(f"unknown benchmark {name!r}; registered: {', '.join(known)}")
    return known[name]
