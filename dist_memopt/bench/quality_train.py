"""One run of the quality study: a megatron-core model trained on the held-out-split stdlib corpus.

The model, its parameter groups (no weight decay on biases and 1-D tensors) and the optimizer are
built by the launcher's own functions (:func:`dist_memopt.train.models.build_model`,
:func:`dist_memopt.train.backends.base.make_optimizer`) from a launcher config, and each iteration is
what the launcher's engines do on one rank: forward, backward, clip to ``train.clip_grad``, step at
the scheduled learning rate (:func:`dist_memopt.train.report.lr_at`). It runs in this process on a
one-rank gloo group (megatron-core needs one), single-threaded unless asked otherwise, with
deterministic algorithms: the same settings give the same ``val_loss`` on the same machine.

Held-out data: the corpus's documents (standard-library files) are split by a hash of their path;
every file whose CRC-32 is divisible by :data:`HOLDOUT_EVERY` goes to the validation set and is never
trained on. Both halves are Megatron indexed datasets (same byte-level tokenizer); the training
batches are cut from the training half exactly as the launcher cuts them, the validation batches
from the other half with a fixed seed, the same for every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

__all__ = ["HOLDOUT_EVERY", "RunSettings", "split_corpus", "train_one", "one_rank_group"]

HOLDOUT_EVERY = 20  # one document in 20 (by path hash) is held out: ~5% of the corpus
VALIDATION_SEED = 0  # the validation batches' window order and masking: the same for every run
_REPO = Path(__file__).resolve().parents[2]


#: SMMF and Alada step the study on their torch path, the reference implementation, so that a
#: recorded run reruns to the same ``val_loss`` whichever fused kernel the machine would take; the
#: fused kernels compute the same equations to rounding (``--set optimizer.params.kernel=...``
#: overrides it, as a new cell)
REFERENCE_KERNEL = {"SMMF": "torch", "Alada": "torch"}


@dataclass(frozen=True)
class RunSettings:
    """Everything a run's result depends on (its cache key is made from these)."""

    model: str  # gpt2, bert or t5: configs/tiny/<model>.yaml
    optimizer: str  # optimizer.type
    params: tuple[tuple[str, Any], ...]  # optimizer.params, sorted
    lr: float
    seed: int
    steps: int
    warmup: int
    overrides: tuple[str, ...]  # model size, batch, schedule: --set items for the launcher config
    eval_every: int
    eval_batches: int
    threads: int

    def config(self):
        """The launcher config of this run."""
        from dist_memopt.train.config import load_config

        items = [
            f"optimizer.type={self.optimizer}",  # first: a later optimizer.type would drop the params
            *(f"optimizer.params.{key}={json.dumps(value)}" for key, value in self.params),
            *self.overrides,
            f"train.lr={self.lr!r}",
            f"train.seed={self.seed}",
            f"train.train_iters={self.steps}",
            f"train.lr_warmup_iters={self.warmup}",
            "parallel.backend=ddp",
            "parallel.nproc=1",
        ]
        if self.optimizer in REFERENCE_KERNEL and not any(key == "kernel" for key, _ in self.params):
            items.append(f"optimizer.params.kernel={json.dumps(REFERENCE_KERNEL[self.optimizer])}")
        return load_config(_REPO / "configs" / "tiny" / f"{self.model}.yaml", items, world_size=1)


def _corpus_files(max_bytes: Optional[int]) -> tuple[Path, list[Path], list[Path]]:
    import sysconfig

    from dist_memopt.train.data import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in stdlib_files(max_bytes):
        held_out = zlib.crc32(path.relative_to(root).as_posix().encode()) % HOLDOUT_EVERY == 0
        (held if held_out else train).append(path)
    return root, train, held


def split_corpus(max_bytes: Optional[int], cache: Optional[str] = None) -> tuple[Path, Path]:
    """(training, validation) indexed-dataset prefixes of the stdlib corpus, built once and cached."""
    from dist_memopt.train.data import build_indexed_dataset, cache_dir

    root, train, held = _corpus_files(max_bytes)
    digest = hashlib.sha256(f"holdout-{HOLDOUT_EVERY} {sys.version} {max_bytes}".encode())
    for path in train + held:
        digest.update(f"{path}:{path.stat().st_size}\n".encode())
    base = cache_dir(cache) / "datasets" / f"stdlib-holdout-{digest.hexdigest()[:12]}"
    prefixes = (Path(f"{base}-train"), Path(f"{base}-valid"))
    for prefix, files in zip(prefixes, (train, held)):
        if not Path(f"{prefix}.idx").exists():
            build_indexed_dataset((p.read_bytes() for p in files), prefix)
    return prefixes


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A one-rank gloo process group for megatron-core's parallel state, unless one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def _validation_batches(config, stream, count: int) -> list[dict[str, torch.Tensor]]:
    import copy

    from dist_memopt.train.batches import BatchMaker

    fixed = copy.deepcopy(config)
    fixed.train.seed = VALIDATION_SEED
    maker = BatchMaker(stream, fixed, rank=0, world_size=1)
    return [maker.make(i, 0) for i in range(count)]


@torch.no_grad()
def _validate(model: torch.nn.Module, kind: str, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean loss per predicted token over all validation batches (dropout off)."""
    from dist_memopt.train.models import token_losses

    model.eval()
    total = count = 0.0
    for batch in batches:
        losses = token_losses(model.forward, kind, batch).float()
        total += float((losses * batch["loss_mask"]).sum())
        count += float(batch["loss_mask"].sum())
    model.train()
    return total / count


def _train_step(model, optimizer, config, batches, iteration: int, kind: str) -> float:
    from dist_memopt.train.models import compute_loss
    from dist_memopt.train.report import lr_at

    lr = lr_at(iteration + 1, config.train)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = compute_loss(model, kind, batches.make(iteration, 0))
    loss.backward()
    if config.train.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_one(settings: RunSettings, log: Optional[Any] = None) -> dict[str, Any]:
    """Train one run; its record (settings, validation curve, final ``val_loss``, state bytes, time)."""
    from dist_memopt.memory import state_bytes
    from dist_memopt.train.backends.base import make_optimizer, no_decay_names
    from dist_memopt.train.batches import BatchMaker
    from dist_memopt.train.data import TokenStream
    from dist_memopt.train.models import build_model, init_megatron

    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = settings.config()
    train_prefix, valid_prefix = split_corpus(config.data.corpus_max_bytes, config.data.cache_dir)
    began = time.perf_counter()
    with one_rank_group():
        init_megatron(settings.seed)
        model = build_model(config)
        optimizer = make_optimizer(config, model.named_parameters(), no_decay_names(model))
        batches = BatchMaker(TokenStream(train_prefix), config, rank=0, world_size=1)
        valid = _validation_batches(config, TokenStream(valid_prefix), settings.eval_batches)
        curve, losses = [(0, _validate(model, config.model.type, valid))], []
        for iteration in range(settings.steps):
            losses.append(_train_step(model, optimizer, config, batches, iteration, config.model.type))
            if not math.isfinite(losses[-1]):
                break
            done = iteration + 1
            if done % settings.eval_every == 0 or done == settings.steps:
                curve.append((done, _validate(model, config.model.type, valid)))
                if log:
                    print(f"    step {done:>5} train {losses[-1]:.4f} val {curve[-1][1]:.4f}", file=log, flush=True)
        state = state_bytes(optimizer)
        num_params = sum(p.numel() for p in model.parameters())
    diverged = not math.isfinite(losses[-1])
    return {
        "val_loss": float("nan") if diverged else curve[-1][1],
        "diverged": diverged,
        "val_curve": curve,
        "train_loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "state_bytes_per_rank": state,
        "num_parameters": num_params,
        "optimizer_params": {k: v for k, v in config.optimizer.params.items()},
        "wall_seconds": time.perf_counter() - began,
        "threads": torch.get_num_threads(),
    }


def threads_default() -> int:
    """1 unless OMP_NUM_THREADS says otherwise: results are reproducible at a fixed thread count."""
    return int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
