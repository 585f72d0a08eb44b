"""Quality comparison: the tiny BERT, GPT-2 and T5 configs trained with each optimizer.

The SMMF paper's Tables 3 and 4 in miniature: every optimizer runs the same number of
iterations on the same batches, with Table 18's hyperparameters (see
:mod:`dist_memopt.train.optimizers`) and the config's learning-rate schedule; nothing is tuned per
optimizer. Each run is a real ``dist_memopt.train.run`` job (so ``parallel.nproc`` processes); the default
backend is DDP, because the baselines only handle whole tensors (our optimizers give the same
numbers on FSDP2, sharded). Prints a table of final loss and optimizer-state MiB and writes
``quality.json``, ``quality.md`` and ``quality.png`` (loss curves) under ``--out``.

    python -m dist_memopt.bench quality [--steps 100] [--models gpt2,bert,t5] [--optimizers AdamW,SMMF,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dist_memopt.bench.registry import Benchmark, register

__all__ = ["add_arguments", "run", "OPTIMIZERS", "MODELS"]

OPTIMIZERS = ("AdamW", "Adafactor", "CAME", "SM3", "SMMF", "Alada")
MODELS = ("gpt2", "bert", "t5")
_REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of its own; --models and --optimizers are the CLI's shared ones."""
    parser.add_argument("--steps", type=int, default=100, help="iterations per run (default 100)")
    parser.add_argument("--backend", default="ddp", help="parallel.backend for every run (default ddp)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    parser.add_argument("--config-dir", type=Path, default=_REPO / "configs" / "tiny")
    parser.add_argument("--out", type=Path, default=Path("runs") / "quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run (repeatable)")


def _train(config: Path, optimizer: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    overrides = [
        f"optimizer.type={optimizer}",
        f"train.train_iters={args.steps}",
        f"train.lr_warmup_iters={args.steps // 10}",  # a tenth, as in the tiny configs (10 of 100)
        f"parallel.backend={args.backend}",
        f"parallel.nproc={args.nproc}",
        f"log.run_dir={run_dir}",
        "log.progress_bar=false",
        "checkpoint.save_interval=0",
        "checkpoint.save_final=false",
        *args.overrides,
    ]
    command = [sys.executable, "-m", "dist_memopt.train.run", "--config", str(config)] + [f"--set={o}" for o in overrides]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.txt", "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=_REPO)
    log = run_dir / "log.json"
    if code != 0 or not log.exists():
        return {"error": f"exit code {code}; see {run_dir / 'stdout.txt'}"}
    data = json.loads(log.read_text())
    losses = [h["loss"] for h in data["history"]]
    tail = losses[-10:]
    return {
        "final_loss": losses[-1],
        "mean_last_10": sum(tail) / len(tail),
        "state_mib_per_rank": max(m["state_bytes"] for m in data["memory_per_rank"]) / MiB,
        "adamw_mib_per_rank": max(m["adamw_bytes"] for m in data["memory_per_rank"]) / MiB,
        "curve": [(h["iteration"], h["loss"]) for h in data["history"]],
    }


def _table(results: dict[str, dict[str, dict]], models: list[str], optimizers: list[str]) -> str:
    lines = [
        "| model | optimizer | final loss | mean of last 10 | vs AdamW | state MiB/rank |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        reference = results[model].get("AdamW", {}).get("mean_last_10")
        for name in optimizers:
            r = results[model][name]
            if "error" in r:
                lines.append(f"| {model} | {name} | failed: {r['error']} | | | |")
                continue
            relative = f"{100 * (r['mean_last_10'] / reference - 1):+.1f}%" if reference else "—"
            lines.append(
                f"| {model} | {name} | {r['final_loss']:.4f} | {r['mean_last_10']:.4f} | {relative} | "
                f"{r['state_mib_per_rank']:.3f} |"
            )
    return "\n".join(lines)


def _plot(path: Path, results: dict[str, dict[str, dict]], models: list[str], steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        curves = {name: r for name, r in results[model].items() if "curve" in r}
        for name, r in curves.items():
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, label=f"{name} ({r['state_mib_per_rank']:.2f} MiB, final {r['final_loss']:.2f})", linewidth=1.3)
        if curves:  # diverged runs leave the top of the plot instead of flattening the others
            start = max(r["curve"][0][1] for r in curves.values())
            low = min(min(y for _, y in r["curve"]) for r in curves.values())
            ax.set_ylim(low - 0.1, start * 1.08)
        ax.set_title(f"tiny {model}, {steps} iterations")
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train every (model, optimizer) pair, then print and write the table and the curves."""
    # every model here is a tiny config; "tiny" (the other benchmarks' tiny GPT-2) means gpt2
    args.models = list(dict.fromkeys("gpt2" if m == "tiny" else m for m in args.models))
    unknown = [m for m in args.models if m not in MODELS] + [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"quality benchmark: no tiny config or trainer option for {unknown}; models {MODELS}, optimizers {OPTIMIZERS}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict]] = {m: {} for m in args.models}
    began = time.time()
    for model in args.models:
        for name in args.optimizers:
            tic = time.time()
            results[model][name] = r = _train(args.config_dir / f"{model}.yaml", name, args, args.out / f"{model}-{name.lower()}")
            status = r.get("error") or f"final loss {r['final_loss']:.4f}, {r['state_mib_per_rank']:.3f} MiB/rank"
            print(f"{model:>5} {name:<9} {status} ({time.time() - tic:.0f}s)", flush=True)
    table = _table(results, args.models, args.optimizers)
    print()
    print(table)
    (args.out / "quality.md").write_text(table + "\n")
    (args.out / "quality.json").write_text(json.dumps({"steps": args.steps, "backend": args.backend, "nproc": args.nproc, "results": results}, indent=1))
    _plot(args.out / "quality.png", results, args.models, args.steps)
    print(f"\nwrote {args.out / 'quality.md'}, quality.json and quality.png ({time.time() - began:.0f}s)")
    return results


register(
    Benchmark(
        name="quality",
        summary="tiny GPT-2, BERT and T5 trained with AdamW, Adafactor, CAME, SM3, SMMF and Alada: final loss, state MiB, curves",
        run=run,
        add_arguments=add_arguments,
        defaults={"models": list(MODELS), "optimizers": list(OPTIMIZERS)},
    )
)
