"""Quality study: does SMMF (or Alada) train as well as tuned AdamW? Held-out perplexity at CPU scale.

GPT-2, BERT and T5 (megatron-core, built as the launcher builds them; see
:mod:`dist_memopt.bench.quality_train`) are trained for ``--steps`` iterations on the training half
of the stdlib corpus and evaluated on the held-out half every ``--eval-every`` steps. Each
optimizer ("contender") runs a learning-rate grid at the first seed, widened by one rate on the
side where the best one lies at the edge (up to twice); the other seeds run at its best learning
rate (lowest held-out loss at the first seed). CAME runs at AdamW's best learning rate, as every
baseline ran at Adam's in the SMMF paper's Table 18, and each extra ``--alada-beta2`` at Alada's
best. Warm-up (a tenth of the steps), schedule and the model-side settings are the same for
every optimizer.

Every run is a record in the ``--json`` file, cached by its settings: a study that stops continues
where it stopped, a cell already there is not rerun, and ``--budget-minutes`` starts no run that
would not finish in time. ``--render FILE`` only draws the table and plots of a results file.

    python -m dist_memopt.bench quality --json docs/results/quality.json --out docs/results
    python -m dist_memopt.bench quality --models gpt2 --optimizers SMMF --lrs 0.003 --seeds 0 \
        --steps 1000 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from dist_memopt.bench.quality_train import RunSettings, threads_default, train_one
from dist_memopt.bench.registry import Benchmark, int_at_least, register

__all__ = ["add_arguments", "run", "Contender", "CONTENDERS", "MODELS", "study_cells", "load_study"]

MODELS = ("gpt2", "bert", "t5")

#: the model size of the study (why this size: docs/quality.md), dropout off (1,000 steps on fresh
#: data underfit), a larger slice of the corpus so the held-out documents are varied
SIZE: tuple[str, ...] = (
    "model.num_layers=2",
    "model.hidden_size=128",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=512",
    "model.seq_length=64",
    "model.max_position_embeddings=64",
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "data.corpus_max_bytes=16000000",
)
_MODEL_SIZE = {
    "t5": ("model.encoder_num_layers=2", "model.decoder_num_layers=2", "model.kv_channels=32", "model.decoder_seq_length=32")
}
_GRID = (1e-3, 3e-3, 1e-2)
#: a sweep whose best rate is at an edge of its grid grows along this ladder, at most _EXTEND times
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
_EXTEND = 2


@dataclass(frozen=True)
class Contender:
    """An optimizer as the study runs it: its launcher type, constructor arguments and lr grid."""

    label: str
    optimizer: str
    params: tuple[tuple[str, Any], ...] = ()
    lrs: tuple[float, ...] = _GRID
    follows: Optional[str] = None  # runs at this contender's best lr instead of its own grid


#: the paper settings come from dist_memopt.train.optimizers (SMMF Table 18; Alada's paper)
CONTENDERS: dict[str, Contender] = {
    c.label: c
    for c in (
        Contender("AdamW", "AdamW", (("fused", True),)),
        Contender("SMMF", "SMMF"),
        Contender("Alada", "Alada"),
        Contender("Adafactor", "Adafactor", lrs=(1e-2,)),  # torch's recommended relative step size
        Contender("CAME", "CAME", lrs=(3e-3,), follows="AdamW"),
        Contender("SM3", "SM3", (("beta", 0.0),), lrs=(0.1,)),  # the SM3 paper's sums, momentum 0.9
    )
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of its own; --models, --optimizers and --json are the CLI's shared ones."""
    parser.add_argument("--steps", type=int_at_least(1), default=1000, help="iterations per run (default 1000)")
    parser.add_argument("--lrs", type=_floats, help="learning rates for every optimizer (default: each one's grid)")
    parser.add_argument("--seeds", type=_ints, default=[0, 1],
                        help="the first runs the lr sweep, the others the best lr (default 0,1)")
    parser.add_argument("--alada-beta2", type=_floats, default=[0.9],
                        help="Alada's beta2 (default 0.9); extra values run at Alada's best lr")
    parser.add_argument("--eval-every", type=int_at_least(1), default=125, help="steps between validations (default 125)")
    parser.add_argument("--eval-batches", type=int_at_least(1), default=32,
                        help="held-out batches per validation (default 32)")
    parser.add_argument("--threads", type=int_at_least(1), default=threads_default(), help="torch threads (default 1)")
    parser.add_argument("--budget-minutes", type=float,
                        help="start no run that would end after this many minutes (estimated from finished runs)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "quality", help="where the table and plots go")
    parser.add_argument("--render", type=Path, metavar="RESULTS",
                        help="only draw the table and plots of this results file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="launcher-config override for every run (repeatable); an optimizer.params.NAME=VALUE "
                        "one also joins the runs' labels")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --- which runs ----------------------------------------------------------------------------------


def _contenders(args: argparse.Namespace) -> list[Contender]:
    chosen = [CONTENDERS[name] for name in args.optimizers]
    if "Alada" in args.optimizers:
        alada = CONTENDERS["Alada"]
        first, *others = args.alada_beta2
        chosen[args.optimizers.index("Alada")] = dataclasses.replace(alada, params=(("betas", [0.9, first]),))
        chosen += [Contender(f"Alada b2={b}", "Alada", (("betas", [0.9, b]),), follows="Alada") for b in others]
    return chosen


def settings_for(args: argparse.Namespace, model: str, contender: Contender, lr: float, seed: int) -> RunSettings:
    overrides = (*SIZE, *_MODEL_SIZE.get(model, ()), f"train.min_lr={lr / 10!r}", *args.overrides)
    return RunSettings(model, contender.optimizer, contender.params, lr, seed, args.steps, args.steps // 10,
                       overrides, args.eval_every, args.eval_batches, args.threads)


def cell_key(settings: RunSettings) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:16]


def _best_lr(records: dict[str, dict], cells: list[RunSettings]) -> Optional[float]:
    """The lr of the lowest held-out loss among ``cells`` once all of them have run."""
    done = [records.get(cell_key(c)) for c in cells]
    if not cells or any(r is None for r in done):
        return None
    finite = [r for r in done if math.isfinite(r["val_loss"])]
    return min(finite, key=lambda r: r["val_loss"])["lr"] if finite else cells[0].lr


def _widen(lrs: list[float], best: Optional[float]) -> Optional[float]:
    """The next rate on :data:`LADDER` beyond the grid's edge when the best rate is at that edge."""
    if best is None or best not in LADDER or min(lrs) < best < max(lrs):
        return None
    at = LADDER.index(best) + (1 if best == max(lrs) else -1)
    return LADDER[at] if 0 <= at < len(LADDER) and LADDER[at] not in lrs else None


def study_cells(args: argparse.Namespace, records: dict[str, dict]) -> Iterator[tuple[str, RunSettings]]:
    """(label, settings) of every run whose settings are known now, in priority order: the sweeps,
    then runs at another contender's best lr, then the other seeds (best lrs need earlier results)."""
    contenders = _contenders(args)
    first, *others = args.seeds
    by_label = {c.label: c for c in contenders}
    suffix = "".join(f" {o.split('.', 2)[2]}" for o in args.overrides if o.startswith("optimizer.params."))

    def grid(model: str, c: Contender) -> list[RunSettings]:
        leader = by_label.get(c.follows) if c.follows and not args.lrs else None
        if leader is not None:
            best = _best_lr(records, grid(model, leader))
            return [] if best is None else [settings_for(args, model, c, best, first)]
        lrs = list(args.lrs or c.lrs)
        cells = [settings_for(args, model, c, lr, first) for lr in lrs]
        for _ in range(0 if args.lrs or len(lrs) < 2 else _EXTEND):
            wider = _widen(lrs, _best_lr(records, cells))
            if wider is None:
                break
            lrs.append(wider)
            cells.append(settings_for(args, model, c, wider, first))
        return cells

    order = sorted(contenders, key=lambda c: c.follows in by_label)
    for c in order:
        for model in args.models:
            yield from ((c.label + suffix, cell) for cell in grid(model, c))
    for c in order:
        for model in args.models:
            best = _best_lr(records, grid(model, c))
            for seed in others if best is not None else ():
                yield c.label + suffix, settings_for(args, model, c, best, seed)


# --- the results file -------------------------------------------------------------------------------


def load_study(path: Path) -> dict[str, Any]:
    """A results file's ``quality`` section (empty when there is none yet)."""
    if not path.exists():
        return {}
    return json.loads(path.read_text())["benchmarks"]["quality"]


def _machine() -> dict[str, Any]:
    import torch

    return {
        "node": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _command() -> str:
    if sys.argv[0].endswith(os.path.join("bench", "__main__.py")):
        return " ".join(["python -m dist_memopt.bench", *sys.argv[1:]])
    return " ".join(sys.argv)


def _study(records: dict[str, dict], args: argparse.Namespace, commands: list[str]) -> dict[str, Any]:
    """The results file's ``quality`` section: when, where, the commands that ran its records, the records."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "commands": commands,
        "threads": args.threads,
        "records": sorted(records.values(), key=lambda r: (r["model"], r["optimizer"], r["lr"], r["seed"])),
    }


def _save(path: Path, study: dict[str, Any]) -> None:
    """Write ``{"benchmarks": {"quality": study}}`` atomically (the CLI's --json form)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"benchmarks": {"quality": study}}, indent=1) + "\n")
    os.replace(tmp, path)


# --- running -------------------------------------------------------------------------------------


def _estimate(records: dict[str, dict], settings: RunSettings) -> Optional[float]:
    """Seconds a run of ``settings`` should take, from this model's finished runs (None: none yet)."""
    rates = [r["wall_seconds"] / r["steps"] for r in records.values() if r["model"] == settings.model]
    return sorted(rates)[len(rates) // 2] * settings.steps if rates else None


def _plan(records: dict[str, dict], pending: list[tuple[str, RunSettings]]) -> str:
    """How long the runs known so far should take (the sweeps' results add more)."""
    estimates = [_estimate(records, s) for _, s in pending]
    known = [e for e in estimates if e is not None]
    return f"~{sum(known) / 60:.0f} min for {len(known)} of them" if known else "no timing yet"


def _record(label: str, settings: RunSettings, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": cell_key(settings),
        "model": settings.model,
        "optimizer": label,
        "optimizer_type": settings.optimizer,
        "lr": settings.lr,
        "seed": settings.seed,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "val_loss": result["val_loss"],
        "val_ppl": math.exp(result["val_loss"]) if math.isfinite(result["val_loss"]) else float("nan"),
        **{k: v for k, v in result.items() if k != "val_loss"},
        "overrides": list(settings.overrides),
        "eval_every": settings.eval_every,
        "eval_batches": settings.eval_batches,
    }


def _run_cells(args: argparse.Namespace, path: Path, records: dict[str, dict], commands: list[str]) -> list[str]:
    """Run every pending cell (re-planning after each run); returns the ones the budget left out."""
    began, skipped = time.monotonic(), []
    while True:
        done = set(records) | set(skipped)
        pending = [(label, s) for label, s in study_cells(args, records) if cell_key(s) not in done]
        if not pending:
            return skipped
        label, settings = pending[0]
        estimate = _estimate(records, settings)
        used = (time.monotonic() - began) / 60
        name = f"{settings.model:>5} {label:<14} lr {settings.lr:<7g} seed {settings.seed}"
        if args.budget_minutes is not None and estimate is not None and used + estimate / 60 > args.budget_minutes:
            skipped.append(cell_key(settings))
            print(f"{name}: not started, ~{estimate / 60:.1f} min would pass the budget", flush=True)
            continue
        print(f"{name} ({len(pending)} known to run, {_plan(records, pending)}, {used:.1f} min used)", flush=True)
        result = train_one(settings, log=sys.stdout)
        records[cell_key(settings)] = {**_record(label, settings, result), "command": commands[-1]}
        _save(path, _study(records, args, commands))
        print(f"      val_loss {result['val_loss']:.4f} in {result['wall_seconds']:.0f}s", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or only render) the study; returns the results file's ``quality`` section."""
    from dist_memopt.bench.quality_report import render

    if args.render is not None:
        study = json.loads(args.render.read_text())["benchmarks"]["quality"]
        render(study, args.out)
        return study
    args.models = list(dict.fromkeys("gpt2" if m == "tiny" else m for m in args.models))
    unknown = [m for m in args.models if m not in MODELS] + [o for o in args.optimizers if o not in CONTENDERS]
    if unknown:
        raise ValueError(f"quality study: {unknown} not in models {MODELS} or optimizers {tuple(CONTENDERS)}")
    if not args.seeds or not args.alada_beta2:
        raise ValueError("quality study: --seeds and --alada-beta2 need at least one value")
    path = Path(args.json) if args.json else args.out / "quality.json"
    before = load_study(path)
    records = {r["key"]: r for r in before.get("records", [])}
    commands = list(before.get("commands", [before["command"]] if "command" in before else []))
    if _command() not in commands:
        commands.append(_command())
    skipped = _run_cells(args, path, records, commands)
    study = _study(records, args, commands)
    study["not_run_for_budget"] = len(skipped)
    _save(path, study)
    render(study, args.out)
    return study


register(
    Benchmark(
        name="quality",
        summary="held-out perplexity of GPT-2, BERT and T5 trained with AdamW, SMMF, Alada, Adafactor, CAME "
        "and SM3 (lr sweeps, seeds)",
        run=run,
        add_arguments=add_arguments,
        defaults={"models": list(MODELS), "optimizers": list(CONTENDERS)},
    )
)
