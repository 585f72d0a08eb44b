"""Printing tables and writing ``--json`` results, shared by every benchmark.

The JSON convention (reused by later benchmarks and the launcher): one object with the run's
environment and ``"benchmarks": {name: <what that benchmark's run() returned>}``, whether one
benchmark ran or ``all`` did.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any, Sequence

import torch

__all__ = ["format_table", "environment", "load_average", "write_json"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; the first column is left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): timings on a busy machine inflate."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    import dist_memopt
    from dist_memopt.kernels.cpu_build import processor_name, simd_level

    return {
        "dist_memopt": dist_memopt.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": processor_name(),
        "cpu_kernels_simd": simd_level(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "argv": sys.argv,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str, results: dict[str, dict[str, Any]]) -> None:
    """Write ``{"environment": ..., "benchmarks": results}`` to ``path`` (directories created)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"environment": environment(), "benchmarks": results}, f, indent=2, ensure_ascii=False)
        f.write("\n")
