"""DeepSpeed ZeRO engine (stage from ``parallel.zero_stage``), with our optimizers or a baseline.

The ds_config is generated from the run configuration (batch sizes, clipping, ZeRO stage, bf16);
``parallel.deepspeed_config`` is merged on top for anything else. Checkpoints are DeepSpeed's own
(``engine.save_checkpoint``/``load_checkpoint``): each rank writes its optimizer partition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_memopt.train.backends.base import Engine, make_optimizer, no_decay_names

__all__ = ["DeepSpeedEngine", "build", "ds_config"]

_TAG = "deepspeed"


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def ds_config(config, world_size: int) -> dict[str, Any]:
    """The ds_config dictionary for this run."""
    t = config.train
    generated = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": config.num_microbatches(world_size),
        "gradient_clipping": t.clip_grad,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        # SMMF/Alada are registered by dist_memopt.integrations.deepspeed; the baselines CAME and
        # SM3 are not in ZeRO's list and would be factorized per flat partition (not exact)
        "zero_allow_untested_optimizer": config.optimizer.type not in ("SMMF", "Alada"),
        "bf16": {"enabled": t.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(generated, config.parallel.deepspeed_config)


def initialize_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """``deepspeed.initialize`` with a client optimizer instance (param groups from the run config).

    Importing the integration tells SMMF/Alada where each parameter's fragment lies in ZeRO's
    partitions, so the sharded run gives the single-process numbers.
    """
    import deepspeed

    import dist_memopt.integrations.deepspeed  # noqa: F401  (registers SMMF/Alada with ZeRO)

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, config, context) -> None:
        no_decay = no_decay_names(model)
        self.optimizer = make_optimizer(config, model.named_parameters(), no_decay)
        self.stage = config.parallel.zero_stage
        self.engine = initialize_deepspeed(model, self.optimizer, ds_config(config, context.world_size))
        self.model = self.engine

    def backward(self, loss: torch.Tensor, last_micro: bool, num_micro: int) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last_micro:
            self.engine.step()  # only advances the micro-step counter before the boundary

    def step(self) -> None:
        self.engine.step()

    def local_numel(self) -> int:
        if self.stage == 3:  # fp32 partitions enter param_groups only during step()
            return sum(p.ds_tensor.numel() for p in self.engine.module.parameters())
        return super().local_numel()

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=_TAG, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag=_TAG)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / _TAG}")


def build(model: nn.Module, config, context) -> Engine:
    return DeepSpeedEngine(model, config, context)
