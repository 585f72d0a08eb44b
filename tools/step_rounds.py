"""Step-time ratios of ``bench step`` runs grouped by how fast the memory ran in each round.

A shared machine's memory speeds up and slows down within one run; ``bench step`` measures it in
every round (``bandwidth_gb_per_s``, an in-place add). This pools the rounds of one or more result
files and prints, per band of that bandwidth, the median over rounds of each optimizer's time over
fused AdamW's in the same round::

    python tools/step_rounds.py run1.json run2.json ... [--model gpt2] [--bands 60,75,90] [--pair]

``--pair`` joins each round with the next (their mean time and bandwidth) in files whose rounds
time one step each (no ``steps_per_sample`` recorded): Alada's steps alternate between two passes
over the elements and one, and a pair holds one of each, as ``bench step``'s rounds do.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

REFERENCE = "AdamW"


def rounds(paths: list[Path], model: str, pair: bool = False) -> list[tuple[float, dict[str, float]]]:
    """(bandwidth GB/s, {optimizer: step ms}) for every round of every file; with ``pair``, for
    every two consecutive rounds of files of one-step rounds (an odd last round left out)."""
    pooled = []
    for path in paths:
        data: dict[str, Any] = json.loads(path.read_text())
        result = data["benchmarks"]["step"] if "benchmarks" in data else data
        entry = result["models"][model]
        bandwidths = entry.get("bandwidth_gb_per_s") or []
        if not bandwidths:
            raise SystemExit(f"{path}: no per-round bandwidth (run bench step on CPU with this release)")
        times = {name: row["samples_ms"] for name, row in entry["optimizers"].items()}
        found = [(b, {name: t[i] for name, t in times.items()}) for i, b in enumerate(bandwidths)]
        if pair and result.get("steps_per_sample", 1) == 1:
            found = [((b0 + b1) / 2, {name: (t0[name] + t1[name]) / 2 for name in t0})
                     for (b0, t0), (b1, t1) in zip(found[0::2], found[1::2])]
        pooled += found
    return pooled


def by_band(pooled: list[tuple[float, dict[str, float]]], edges: list[float]) -> list[str]:
    """A header and, per non-empty band between ``edges`` (GB/s), its rounds, fused AdamW's median
    time and each optimizer's median ratio to it."""
    bounds = [0.0, *edges, float("inf")]
    names = [n for n in pooled[0][1] if n != REFERENCE]
    lines = [f"{'GB/s':>9}  {'rounds':>6}  {REFERENCE + ' ms':>9}  " + "  ".join(f"{n:>16}" for n in names)]
    for lo, hi in zip(bounds, bounds[1:]):
        band = [times for b, times in pooled if lo <= b < hi]
        if not band:
            continue
        label = f"< {hi:.0f}" if lo == 0 else (f">= {lo:.0f}" if hi == float("inf") else f"{lo:.0f}-{hi:.0f}")
        reference = statistics.median(t[REFERENCE] for t in band)
        ratios = [statistics.median(t[n] / t[REFERENCE] for t in band) for n in names]
        lines.append(f"{label:>9}  {len(band):>6}  {reference:>9.1f}  " + "  ".join(f"{r:>15.2f}x" for r in ratios))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="bench step --json result files")
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--bands", default="60,75,90", help="band edges in GB/s, comma-separated")
    parser.add_argument("--pair", action="store_true", help="join each one-step round with the next (see above)")
    args = parser.parse_args(argv)
    edges = sorted(float(x) for x in args.bands.split(","))
    print("\n".join(by_band(rounds(args.files, args.model, args.pair), edges)))


if __name__ == "__main__":
    main()
