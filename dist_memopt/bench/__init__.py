"""Printed benchmarks: ``python -m dist_memopt.bench <name> [options]`` (``--help`` lists them).

Each benchmark is a module that registers a :class:`Benchmark` (see :mod:`.registry`); shared
pieces are the model shapes (:mod:`.models`), the compared optimizers (:mod:`.optimizers`), the
SMMF paper's figures (:mod:`.paper`) and table/JSON output (:mod:`.report`).
"""

from dist_memopt.bench.registry import BUILTIN_MODULES, Benchmark, benchmarks, get_benchmark, register

__all__ = ["Benchmark", "register", "benchmarks", "get_benchmark", "BUILTIN_MODULES"]
