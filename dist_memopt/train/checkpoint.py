"""Checkpoint directories: model + optimizer (the backend's format), RNG states, trainer state.

``<save>/iter_0000010/`` holds the backend's files (``state/``: DCP for FSDP, DeepSpeed's own for
DeepSpeed), ``rng/rank_N.pt`` (each rank's torch, Megatron tracker, NumPy and Python RNG states:
dropout continues exactly) and ``trainer.json`` (iteration and the loss history so far, so a resumed
run continues the same curve). ``<save>/latest_checkpointed_iteration.txt`` (Megatron's name) is
written last: an interrupted save is never picked up by ``--resume``. Data needs no state: batches
are a function of the iteration (see :mod:`dist_memopt.train.batches`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_resume", "LATEST"]

LATEST = "latest_checkpointed_iteration.txt"


def _iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: Path, iteration: int, engine, trainer_state: dict, rank: int) -> Path:
    """Write checkpoint ``iteration`` (collective: every rank calls it)."""
    path = _iteration_dir(root, iteration)
    (path / "rng").mkdir(parents=True, exist_ok=True)
    engine.save(path / "state")
    torch.save(_rng_state(), path / "rng" / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        (path / "trainer.json").write_text(json.dumps({**trainer_state, "iteration": iteration}))
        (root / LATEST).write_text(f"{iteration}\n")
    dist.barrier()
    return path


def resolve_resume(root: Path, requested: Optional[str]) -> Path:
    """The checkpoint to resume from: ``requested`` (a directory) or the latest under ``root``."""
    if requested:
        path = Path(requested)
        if not (path / "trainer.json").is_file():
            raise FileNotFoundError(f"--resume {requested}: not a checkpoint directory (no trainer.json)")
        return path
    latest = root / LATEST
    if not latest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {root} (missing {LATEST})")
    return _iteration_dir(root, int(latest.read_text().strip()))


def load_checkpoint(path: Path, engine, rank: int) -> dict:
    """Restore model, optimizer and this rank's RNGs from ``path``; return the trainer state."""
    trainer_state = json.loads((path / "trainer.json").read_text())
    engine.load(path / "state")
    rng_file = path / "rng" / f"rank_{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} missing: the checkpoint was written by fewer ranks")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
