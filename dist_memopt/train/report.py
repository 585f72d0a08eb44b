"""What a run leaves behind and prints: the LR schedule, memory lines, JSON log, loss-curve PNG."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, Iterable, Mapping, Optional, Sequence

__all__ = ["lr_at", "memory_line", "write_json", "plot_curves", "falling", "show_progress"]

MiB = 2**20


def lr_at(iteration: int, train) -> float:
    """Megatron's OptimizerParamScheduler at 1-based ``iteration``: linear warmup, then decay to min_lr."""
    warmup = train.lr_warmup_iters
    decay_iters = train.lr_decay_iters or train.train_iters
    if warmup and iteration <= warmup:
        return train.lr * iteration / warmup
    if train.lr_decay_style == "constant":
        return train.lr
    if train.lr_decay_style == "inverse-square-root":
        return max(train.min_lr, train.lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(iteration, 1)))
    if iteration > decay_iters:
        return train.min_lr
    ratio = (iteration - warmup) / max(1, decay_iters - warmup)
    if train.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:  # cosine
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return train.min_lr + coeff * (train.lr - train.min_lr)


def show_progress(wanted: bool, stream: Optional[IO] = None) -> bool:
    """Whether to draw the progress bar: it redraws itself with carriage returns, which belong on a
    terminal, not in a log file (``> run.log 2>&1``); the ``iter ...`` lines are printed either way."""
    stream = sys.stderr if stream is None else stream
    return wanted and bool(getattr(stream, "isatty", lambda: False)())


def memory_line(name: str, per_rank: Sequence[Mapping[str, int]]) -> str:
    """``optimizer state per rank: rank 0 0.01 MiB (AdamW 0.52 MiB, 98.1% less) ...``."""
    parts = []
    for rank, entry in enumerate(per_rank):
        held, adamw = entry["state_bytes"], entry["adamw_bytes"]
        saved = max(0.0, 100.0 * (1 - held / adamw)) if adamw else 0.0
        parts.append(f"rank {rank}: {held / MiB:.3f} MiB (AdamW {adamw / MiB:.3f} MiB, {saved:.1f}% less)")
    return f"{name} optimizer state per rank: " + "; ".join(parts)


def falling(losses: Sequence[float], window: int = 5) -> bool:
    """Mean of the last ``window`` losses below the mean of the first ``window``."""
    if len(losses) < 2 * window:
        raise ValueError(f"need at least {2 * window} losses, got {len(losses)}")
    return sum(losses[-window:]) / window < sum(losses[:window]) / window


def write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=1))


def plot_curves(path: Path, curves: Mapping[str, Iterable[tuple[int, float]]], title: str) -> None:
    """One PNG with a loss curve per label (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, label=label, linewidth=1.4)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
