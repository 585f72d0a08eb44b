"""The pre-training run: process group, data, model, backend, iterations, checkpoints, report.

Every rank runs :func:`run`; rank 0 prints (a tqdm bar with loss, learning rate and tokens/s),
writes ``config.yaml`` at the start and ``log.json`` plus ``loss.png`` at the end.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from dist_memopt.train import checkpoint, report
from dist_memopt.train.config import RunConfig, config_to_dict, to_yaml
from dist_memopt.train.distributed import DistEnv, discover, init_process_group, remove_deepspeed_shm_buffers

__all__ = ["run"]

# megatron-core announces every missing optional accelerator package on import.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")
warnings.filterwarnings("ignore", message=r"Apex is not installed")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")  # TransformerConfig's own default
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)  # DeepSpeed


def _quiet_frameworks() -> None:
    import logging

    for name in ("DeepSpeed", "deepspeed", "megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _dataset_prefix(config: RunConfig, env: DistEnv) -> Path:
    """The configured indexed dataset, or the stdlib corpus (built by rank 0, then shared)."""
    from dist_memopt.train.data import default_dataset

    if config.data.data_path:
        return Path(config.data.data_path)
    if env.is_main:
        prefix = default_dataset(config.data.cache_dir, config.data.corpus_max_bytes)
    dist.barrier()
    if not env.is_main:
        prefix = default_dataset(config.data.cache_dir, config.data.corpus_max_bytes)
    return prefix


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _mean_over_ranks(value: Optional[torch.Tensor], device: torch.device) -> float:
    """The mean of ``value`` over the ranks that have one (all of them, or the last pipeline
    stage's), the same on every rank."""
    pair = torch.zeros(2, device=device)
    if value is not None:
        pair[0], pair[1] = value.detach().float(), 1.0
    dist.all_reduce(pair)
    return pair[0].item() / pair[1].item()


def run(config: RunConfig, resume: Optional[str | bool] = None) -> dict:
    """Train as configured; ``resume`` is True (latest checkpoint) or a checkpoint directory."""
    env = discover()
    init_process_group(env, config.parallel.dist_timeout_s)
    try:
        return _train(config, env, resume)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        if env.world_size > 1 and "MASTER_PORT" in os.environ:  # DeepSpeed's CPU all_reduce leaves them
            remove_deepspeed_shm_buffers(port=int(os.environ["MASTER_PORT"]), addr=os.environ.get("MASTER_ADDR", "127.0.0.1"))


@dataclass
class _Session:
    """What the iterations need: the engine, the batches and where the run starts."""

    engine: Any
    batches: Any
    kind: str
    num_params: int
    num_micro: int
    tokens_per_iteration: int
    start: int = 0
    history: list[dict] = field(default_factory=list)


def _train(config: RunConfig, env: DistEnv, resume: Optional[str | bool]) -> dict:
    _quiet_frameworks()
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, _local_world_size(env))))
    _write_config(config, env)
    session = _start(config, env, resume)
    engine, history = session.engine, session.history
    bar = _progress_bar(config, env, session)
    memory: list[dict] = []
    save_every = config.checkpoint.save_interval
    last_saved = session.start if resume else None
    began = time.perf_counter()
    for iteration in range(session.start, config.train.train_iters):
        record = _iterate(config, env, session, iteration)
        history.append(record)
        if not memory:
            memory = _memory_report(engine)
            if env.is_main:
                bar.write(report.memory_line(config.optimizer.type, memory))
        _show(config, env, bar, record, first=iteration == session.start)
        if save_every and (iteration + 1) % save_every == 0:
            checkpoint.save_checkpoint(config.checkpoint_dir, iteration + 1, engine, {"history": history}, env.rank)
            last_saved = iteration + 1
    bar.close()
    session.engine.finish()
    if config.checkpoint.save_final and last_saved != config.train.train_iters and session.start < config.train.train_iters:
        checkpoint.save_checkpoint(config.checkpoint_dir, config.train.train_iters, engine, {"history": history}, env.rank)
    summary = {
        "config": config_to_dict(config),
        "name": config.name,
        "world_size": env.world_size,
        "launcher": env.launcher,
        "num_parameters": session.num_params,
        "memory_per_rank": memory or _memory_report(engine),
        "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds_this_process": time.perf_counter() - began,
    }
    if env.is_main:
        _finish(config, config.run_dir, summary)
    return summary


def _write_config(config: RunConfig, env: DistEnv) -> None:
    if env.is_main:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "config.yaml").write_text(to_yaml(config))
        print(f"# resolved config ({config.name}), saved to {config.run_dir / 'config.yaml'}\n{to_yaml(config)}", flush=True)


def _start(config: RunConfig, env: DistEnv, resume: Optional[str | bool]) -> _Session:
    """Data, model and engine, restored from a checkpoint when resuming; rank 0 says what runs."""
    from dist_memopt.train.backends import build_engine
    from dist_memopt.train.batches import BatchMaker
    from dist_memopt.train.data import TokenStream
    from dist_memopt.train.models import build_model, init_megatron

    stream = TokenStream(_dataset_prefix(config, env))
    init_megatron(config.train.seed, config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size)
    batches = BatchMaker(stream, config, *_data_parallel_rank())
    model = build_model(config).to(env.device)
    session = _Session(
        engine=build_engine(model, config, env),
        batches=batches,
        kind=config.model.type,
        num_params=sum(p.numel() for p in model.parameters()),
        num_micro=config.num_microbatches(env.world_size),
        tokens_per_iteration=config.train.global_batch_size * batches.tokens_per_sample(),
    )
    if resume:
        path = checkpoint.resolve_resume(config.checkpoint_dir, resume if isinstance(resume, str) else None)
        state = checkpoint.load_checkpoint(path, session.engine, env.rank)
        session.start, session.history = state["iteration"], state["history"]
        if env.is_main:
            print(f"resumed from {path} at iteration {session.start}", flush=True)
    if env.is_main:
        print(
            f"{session.kind} ({session.num_params / 1e6:.2f}M parameters{_per_rank(config)}) | {config.optimizer.type} | "
            f"backend {config.parallel.backend} | {env.world_size} rank(s) via {env.launcher}{_layout(config)} | "
            f"{stream.num_tokens / 1e6:.1f}M tokens | global batch {config.train.global_batch_size} = "
            f"{session.num_micro} x {config.train.micro_batch_size} x {batches.world_size}",
            flush=True,
        )
    return session


def _progress_bar(config: RunConfig, env: DistEnv, session: _Session):
    from tqdm import tqdm

    shown = report.show_progress(env.is_main and config.log.progress_bar)
    return tqdm(total=config.train.train_iters, initial=session.start, disable=not shown, dynamic_ncols=True,
                desc=f"{session.kind}/{config.optimizer.type}", file=sys.stderr)


def _iterate(config: RunConfig, env: DistEnv, session: _Session, iteration: int) -> dict:
    """One iteration: the micro-batches' forward/backward, the step; its history record."""
    tic = time.perf_counter()
    lr = report.lr_at(iteration + 1, config.train)
    session.engine.set_lr(lr)
    batches = (_to_device(session.batches.make(iteration, micro), env.device) for micro in range(session.num_micro))
    loss = session.engine.train_step(batches, session.kind, session.num_micro)
    loss_value = _mean_over_ranks(loss, env.device)
    seconds = time.perf_counter() - tic
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss became {loss_value} at iteration {iteration + 1}")
    return {"iteration": iteration + 1, "loss": loss_value, "lr": lr, "tokens_per_s": session.tokens_per_iteration / seconds}


def _show(config: RunConfig, env: DistEnv, bar, record: dict, first: bool) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
    if env.is_main and (record["iteration"] % config.log.log_interval == 0 or first):
        bar.write(f"iter {record['iteration']:>7d} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                  f"{record['tokens_per_s']:,.0f} tokens/s")


def _per_rank(config: RunConfig) -> str:
    """Whose parameters rank 0 counts: its TP piece, of the first pipeline stage."""
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    if pp > 1:
        return " on the first pipeline stage's TP rank" if tp > 1 else " on the first pipeline stage"
    return " on this TP rank" if tp > 1 else ""


def _layout(config: RunConfig) -> str:
    p = config.parallel
    parts = []
    if p.tensor_model_parallel_size > 1:
        parts.append(f"tensor parallel {p.tensor_model_parallel_size}" + (", sequence parallel" if p.sequence_parallel else ""))
    if p.pipeline_model_parallel_size > 1:
        parts.append(f"pipeline parallel {p.pipeline_model_parallel_size}")
    return f" ({', '.join(parts)})" if parts else ""


def _data_parallel_rank() -> tuple[int, int]:
    """This rank's place among the ranks that see different data (tensor-parallel peers share it)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def _local_world_size(env: DistEnv) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))


def _memory_report(engine) -> list[dict]:
    """Each rank's optimizer-state bytes and what AdamW's two fp32 moments would take there."""
    mine = {"state_bytes": engine.state_bytes(), "adamw_bytes": 8 * engine.local_numel()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def _finish(config: RunConfig, run_dir: Path, summary: dict) -> None:
    history = summary["history"]
    report.write_json(run_dir / "log.json", summary)
    plotted = False
    if config.log.plot and history:
        try:
            report.plot_curves(
                run_dir / "loss.png",
                {f"{config.optimizer.type} ({config.parallel.backend})": [(h["iteration"], h["loss"]) for h in history]},
                f"{config.name}: {config.model.type} pre-training",
            )
            plotted = True
        except ImportError:
            print("matplotlib is not installed: no loss.png (pip install 'dist-memopt[bench]')")
    if len(history) >= 2:
        k = min(5, len(history) // 2)
        first = sum(h["loss"] for h in history[:k]) / k
        last = sum(h["loss"] for h in history[-k:]) / k
        print(f"loss {first:.4f} -> {last:.4f} (mean of first/last {k} iterations)")
    print(report.memory_line(config.optimizer.type, summary["memory_per_rank"]))
    print(f"wrote {run_dir / 'log.json'}" + (f" and {run_dir / 'loss.png'}" if plotted else ""), flush=True)
