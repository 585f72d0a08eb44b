"""The quality study's table and plots, drawn from a results file's records alone.

Best learning rate: the one whose first-seed run has the lowest held-out loss (the study's
choice too). At that rate the table gives the mean held-out perplexity over the seeds, its spread
(half the range), the gap to AdamW's mean at AdamW's best rate, the optimizer-state MiB per rank
and the first-seed perplexity at every swept rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["summarize", "table", "plot_curves", "plot_lr", "render"]

MiB = 2**20
_ORDER = ("AdamW", "SMMF", "Alada", "Adafactor", "CAME", "SM3")


def _labels(records: Iterable[dict]) -> list[str]:
    found = {r["optimizer"] for r in records}
    return [x for x in _ORDER if x in found] + sorted(found - set(_ORDER))


def _models(records: Iterable[dict]) -> list[str]:
    found = {r["model"] for r in records}
    return [m for m in ("gpt2", "bert", "t5") if m in found] + sorted(found - {"gpt2", "bert", "t5"})


def summarize(records: list[dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (model, optimizer): best lr, its seeds' perplexities, the sweep, state MiB, the best curve."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["optimizer"])].append(r)
    out = {}
    for key, runs in groups.items():
        first_seed = min(r["seed"] for r in runs)
        sweep = {r["lr"]: r for r in runs if r["seed"] == first_seed}
        finite = {lr: r for lr, r in sweep.items() if math.isfinite(r["val_loss"])}
        best = min(finite, key=lambda lr: finite[lr]["val_loss"]) if finite else min(sweep)
        ppl = [r["val_ppl"] for r in runs if r["lr"] == best]
        out[key] = {
            "best_lr": best,
            "ppl": ppl,
            "mean_ppl": sum(ppl) / len(ppl),
            "spread": (max(ppl) - min(ppl)) / 2,
            "sweep": {lr: r["val_ppl"] for lr, r in sorted(sweep.items())},
            "state_mib": sweep[best]["state_bytes_per_rank"] / MiB,
            "curve": sweep[best]["val_curve"],
        }
    return out


def _ppl(value: float) -> str:
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.3f}" if value < 1e4 else f"{value:.2e}"


def table(records: list[dict]) -> str:
    """A Markdown table: one row per model and optimizer."""
    summary = summarize(records)
    lines = [
        "| model | optimizer | best lr | held-out ppl (mean) | seeds | spread (±) | vs AdamW | state MiB/rank "
        "| ppl at each lr (first seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in _models(records):
        reference = summary.get((model, "AdamW"), {}).get("mean_ppl")
        for label in _labels(records):
            s = summary.get((model, label))
            if s is None:
                continue
            finite = reference and math.isfinite(s["mean_ppl"]) and s["mean_ppl"] < 1e4
            gap = f"{100 * (s['mean_ppl'] / reference - 1):+.2f}%" if finite else "—"
            sweep = ", ".join(f"{lr:g}: {_ppl(p)}" for lr, p in s["sweep"].items())
            lines.append(
                f"| {model} | {label} | {s['best_lr']:g} | {_ppl(s['mean_ppl'])} | {len(s['ppl'])} | "
                f"{s['spread']:.3f} | {gap} | {s['state_mib']:.3f} | {sweep} |"
            )
    return "\n".join(lines)


def _figure(count: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(5.2 * count, 4.2), squeeze=False)
    return plt, fig, axes[0]


def _ceiling(summary: dict, model: str) -> float:
    """The plots' top: 2.5 times the model's best final perplexity (diverging runs would flatten the rest)."""
    finals = [p for (m, _), s in summary.items() if m == model for p in s["sweep"].values() if math.isfinite(p)]
    return 2.5 * min(finals) if finals else math.inf


def _draw(records: list[dict], path: Path, panel: Callable, title: str, xlabel: str, log_x: bool) -> None:
    """One panel per model; ``panel(ax, label, summary, ceiling)`` draws one optimizer in it."""
    summary, models = summarize(records), _models(records)
    plt, fig, axes = _figure(len(models))
    for ax, model in zip(axes, models):
        ceiling = _ceiling(summary, model)
        for label in _labels(records):
            if (model, label) in summary:
                panel(ax, label, summary[(model, label)], ceiling)
        ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
        if math.isfinite(ceiling):
            ax.set_ylim(top=ceiling)
        ax.set(title=f"{model}: {title}", xlabel=xlabel, ylabel="held-out perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve(ax, label: str, s: dict[str, Any], ceiling: float) -> None:
    steps, losses = zip(*s["curve"][1:] or s["curve"])
    ppl = [min(math.exp(x), ceiling) if math.isfinite(x) else ceiling for x in losses]
    ax.plot(steps, ppl, label=f"{label} (lr {s['best_lr']:g})", linewidth=1.3)


def _sweep(ax, label: str, s: dict[str, Any], ceiling: float) -> None:
    lrs = list(s["sweep"])
    ppl = [p if math.isfinite(p) and p < ceiling else ceiling for p in s["sweep"].values()]
    (line,) = ax.plot(lrs, ppl, marker="o", label=label, linewidth=1.3)
    over = [lr for lr, p in zip(lrs, ppl) if p == ceiling]
    ax.plot(over, [ceiling] * len(over), "^", color=line.get_color(), markersize=9)


def plot_curves(records: list[dict], path: Path) -> None:
    """Held-out perplexity against step, each optimizer at its best lr (first seed)."""
    _draw(records, path, _curve, "held-out perplexity (clipped at the top)", "step", log_x=False)


def plot_lr(records: list[dict], path: Path) -> None:
    """Final held-out perplexity against learning rate (first seed): how robust to the step size.
    Runs beyond the plot's top (or diverged) are triangles on it."""
    _draw(records, path, _sweep, "final perplexity vs learning rate", "peak learning rate", log_x=True)


def render(study: dict[str, Any], out: Path) -> list[Path]:
    """Print the table; write ``quality.md``, ``quality_curves.png`` and ``quality_lr.png`` under ``out``."""
    records = study["records"]
    out.mkdir(parents=True, exist_ok=True)
    text = table(records)
    print(text)
    paths = [out / "quality.md", out / "quality_curves.png", out / "quality_lr.png"]
    paths[0].write_text(text + "\n")
    if records:
        plot_curves(records, paths[1])
        plot_lr(records, paths[2])
    return paths
