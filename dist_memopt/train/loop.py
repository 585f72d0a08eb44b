"""The pre-training run: process group, data, model, backend, iterations, checkpoints, report.

Every rank runs :func:`run`; rank 0 prints (a tqdm bar with loss, learning rate and tokens/s),
writes ``config.yaml`` at the start and ``log.json`` plus ``loss.png`` at the end.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dist_memopt.train import checkpoint, report
from dist_memopt.train.config import RunConfig, config_to_dict, to_yaml
from dist_memopt.train.distributed import DistEnv, discover, init_process_group

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


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


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


def _train(config: RunConfig, env: DistEnv, resume: Optional[str | bool]) -> dict:
    from tqdm import tqdm

    from dist_memopt.train.backends import build_engine
    from dist_memopt.train.batches import BatchMaker
    from dist_memopt.train.data import TokenStream
    from dist_memopt.train.models import build_model, compute_loss, init_megatron

    _quiet_frameworks()
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, _local_world_size(env))))
    run_dir = config.run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))
        print(f"# resolved config ({config.name}), saved to {run_dir / 'config.yaml'}\n{to_yaml(config)}", flush=True)

    stream = TokenStream(_dataset_prefix(config, env))
    init_megatron(config.train.seed, config.parallel.tensor_model_parallel_size)
    batches = BatchMaker(stream, config, *_data_parallel_rank())
    model = build_model(config).to(env.device)
    num_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, config, env)
    num_micro = config.num_microbatches(env.world_size)
    kind = config.model.type

    history: list[dict] = []
    start = 0
    if resume:
        path = checkpoint.resolve_resume(config.checkpoint_dir, resume if isinstance(resume, str) else None)
        state = checkpoint.load_checkpoint(path, engine, env.rank)
        start, history = state["iteration"], state["history"]
        if env.is_main:
            print(f"resumed from {path} at iteration {start}", flush=True)

    if env.is_main:
        print(
            f"{kind} ({num_params / 1e6:.2f}M parameters{_per_rank(config)}) | {config.optimizer.type} | backend {config.parallel.backend} | "
            f"{env.world_size} rank(s) via {env.launcher}{_layout(config)} | {stream.num_tokens / 1e6:.1f}M tokens | "
            f"global batch {config.train.global_batch_size} = {num_micro} x {config.train.micro_batch_size} x {batches.world_size}",
            flush=True,
        )
    tokens_per_iteration = config.train.global_batch_size * batches.tokens_per_sample()
    bar = tqdm(total=config.train.train_iters, initial=start, disable=not (env.is_main and config.log.progress_bar),
               dynamic_ncols=True, desc=f"{kind}/{config.optimizer.type}")
    memory: list[dict] = []
    save_every = config.checkpoint.save_interval
    last_saved = start if resume else None
    began = time.perf_counter()

    for iteration in range(start, config.train.train_iters):
        tic = time.perf_counter()
        lr = report.lr_at(iteration + 1, config.train)
        engine.set_lr(lr)
        total = torch.zeros((), device=env.device)
        for micro in range(num_micro):
            batch = _to_device(batches.make(iteration, micro), env.device)
            loss = compute_loss(engine, kind, batch)
            engine.backward(loss, micro == num_micro - 1, num_micro)
            total += loss.detach()
        engine.step()
        loss_value = _mean_over_ranks(total / num_micro)
        seconds = time.perf_counter() - tic
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at iteration {iteration + 1}")
        history.append({"iteration": iteration + 1, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_iteration / seconds})
        if not memory:
            memory = _memory_report(engine)
            if env.is_main:
                bar.write(report.memory_line(config.optimizer.type, memory))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_iteration / seconds:,.0f}")
        if env.is_main and ((iteration + 1) % config.log.log_interval == 0 or iteration == start):
            bar.write(f"iter {iteration + 1:>7d} | loss {loss_value:.4f} | lr {lr:.3e} | {tokens_per_iteration / seconds:,.0f} tokens/s")
        if save_every and (iteration + 1) % save_every == 0:
            checkpoint.save_checkpoint(config.checkpoint_dir, iteration + 1, engine, {"history": history}, env.rank)
            last_saved = iteration + 1
    bar.close()
    if config.checkpoint.save_final and last_saved != config.train.train_iters and start < config.train.train_iters:
        checkpoint.save_checkpoint(config.checkpoint_dir, config.train.train_iters, engine, {"history": history}, env.rank)
    if not memory:
        memory = _memory_report(engine)

    summary = {
        "config": config_to_dict(config),
        "name": config.name,
        "world_size": env.world_size,
        "launcher": env.launcher,
        "num_parameters": num_params,
        "memory_per_rank": memory,
        "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds_this_process": time.perf_counter() - began,
    }
    if env.is_main:
        _finish(config, run_dir, summary)
    return summary


def _per_rank(config: RunConfig) -> str:
    return " on this TP rank" if config.parallel.tensor_model_parallel_size > 1 else ""


def _layout(config: RunConfig) -> str:
    p = config.parallel
    if p.tensor_model_parallel_size == 1:
        return ""
    return f" (tensor parallel {p.tensor_model_parallel_size}{', sequence parallel' if p.sequence_parallel else ''})"


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
