"""Megatron-core's own data parallelism: ``DistributedDataParallel`` + ``DistributedOptimizer``.

What Megatron-LM runs: the model (in ``Float16Module`` for bf16) is wrapped in Megatron's DDP
(contiguous fp32 gradient buffers reduce-scattered over the data-parallel group) and the optimizer
comes from :func:`dist_memopt.integrations.megatron.get_megatron_optimizer` with
``use_distributed_optimizer=True``: SMMF and Alada on the distributed optimizer's fp32 shards, or
AdamW through Megatron's own Adam. With ``parallel.tensor_model_parallel_size`` > 1 (and
``sequence_parallel``) the model is split by Megatron's tensor parallelism and the optimizer steps
each rank's piece exactly as the TP=1 parameter; with ``parallel.pipeline_model_parallel_size`` > 1
each rank holds one pipeline stage's layers. Every iteration runs Megatron-core's own schedule
(``get_forward_backward_func()``: 1F1B across stages), as Megatron-LM's ``train_step`` does; the
loss comes from the last stage. Clipping is Megatron's (``train.clip_grad``, the norm over all
stages); biases and 1-D parameters get no weight decay (Megatron's ``wd_mult``). Checkpoints are Megatron distributed
checkpoints (``torch_dist``). On CPU, :mod:`dist_memopt.integrations.megatron.cpu_shims` (installed
with the model) puts megatron-core's buffers on the CPU and the collectives go over gloo.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_memopt.train.backends.base import Engine

__all__ = ["MegatronEngine", "build", "check", "MEGATRON_OPTIMIZERS"]

# optimizer.type -> Megatron's OptimizerConfig.optimizer
MEGATRON_OPTIMIZERS = {"SMMF": "smmf", "Alada": "alada", "AdamW": "adam"}
# Megatron-LM's --dist-ckpt-optim sharding for its own Adam (SMMF/Alada have one format)
_CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def check(config) -> None:
    """Raise ConfigError for what this backend cannot build (called while the config is validated)."""
    from dist_memopt.train.errors import ConfigError

    if config.optimizer.type not in MEGATRON_OPTIMIZERS:
        raise ConfigError(
            f"optimizer.type {config.optimizer.type}: parallel.backend megatron builds Megatron's "
            f"optimizers, which are {', '.join(MEGATRON_OPTIMIZERS)} (SMMF and Alada through dist_memopt)"
        )
    unknown = sorted(set(config.optimizer.params) - {"betas", "eps"}) if config.optimizer.type == "AdamW" else []
    if unknown:
        raise ConfigError(f"optimizer.params {unknown}: Megatron's Adam takes betas and eps only")


def _optimizer_setup(config) -> tuple[Any, dict]:
    """Megatron's OptimizerConfig for this run, and the SMMF/Alada keyword arguments."""
    from megatron.core.optimizer import OptimizerConfig

    t, params = config.train, dict(config.optimizer.params)
    fields: dict[str, Any] = dict(
        optimizer=MEGATRON_OPTIMIZERS[config.optimizer.type], lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        clip_grad=t.clip_grad, bf16=t.bf16, use_distributed_optimizer=True,
    )
    if config.optimizer.type == "AdamW":
        beta1, beta2 = params.pop("betas", (0.9, 0.999))
        fields.update(adam_beta1=beta1, adam_beta2=beta2, adam_eps=params.pop("eps", 1e-8), decoupled_weight_decay=True)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return OptimizerConfig(**fields), kwargs


def _forward_step(kind: str, data_iterator: Iterator[dict[str, torch.Tensor]], model: nn.Module) -> tuple:
    """Megatron's ``forward_step_func``: the stage's output and, for the last stage, the loss."""
    from dist_memopt.train.models import token_losses

    batch = next(data_iterator)
    return token_losses(model, kind, batch), functools.partial(_loss, batch["loss_mask"])


def _loss(mask: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from dist_memopt.train.models import masked_mean

    loss = masked_mean(losses, mask)
    return loss, {"loss": loss.detach().clone()}  # the schedule divides ``loss`` in place


class MegatronEngine(Engine):
    def __init__(self, model: nn.Module, config, context) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.transformer.module import Float16Module

        from dist_memopt.integrations.megatron import get_megatron_optimizer

        module = Float16Module(model.config, model) if config.train.bf16 else model
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
        self.model = DistributedDataParallel(model.config, ddp_config, module)
        optimizer_config, kwargs = _optimizer_setup(config)
        self.megatron_optimizer = get_megatron_optimizer(optimizer_config, [self.model], **kwargs)
        self.optimizer = self.megatron_optimizer  # its param_groups are the inner optimizers' groups
        self.weight_decay = config.train.weight_decay
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        # what Megatron-LM's training loop hands its schedule
        model.config.grad_scale_func = self.megatron_optimizer.scale_loss
        model.config.finalize_model_grads_func = finalize_model_grads
        self.seq_length, self.decoder_seq_length = config.model.seq_length, config.model.decoder_seq_length
        self.micro_batch_size = config.train.micro_batch_size

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.optimizer for o in self.megatron_optimizer.chained_optimizers if o.optimizer is not None]

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]], kind: str, num_micro: int) -> Optional[torch.Tensor]:
        """Megatron's schedule for the layout (1F1B across pipeline stages; one after another
        without them): the loss scaled by the optimizer and divided by ``num_micro``, gradients
        accumulated in DDP's buffers and reduced once at the end by ``finalize_model_grads``
        (the data-parallel reduce-scatter, sequence-parallel norms over TP, tied embeddings across
        the first and last stage), then Megatron's step (clipping by the norm over all stages)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.megatron_optimizer.zero_grad()
        self.model.zero_grad_buffer()
        reported = get_forward_backward_func()(
            forward_step_func=functools.partial(_forward_step, kind), data_iterator=batches, model=[self.model],
            num_microbatches=num_micro, seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
            decoder_seq_length=self.decoder_seq_length, forward_only=False,
        )
        success, _, _ = self.megatron_optimizer.step()
        if not success:
            raise FloatingPointError("Megatron skipped the optimizer step: non-finite gradients")
        if not reported:  # a pipeline stage before the last
            return None
        total = reported[0]["loss"]
        for item in reported[1:]:
            total = total + item["loss"]
        return total / num_micro

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def _sharded_state(self, is_loading: bool) -> dict[str, Any]:
        model_state = self.model.module.sharded_state_dict()
        optimizer_state = self.megatron_optimizer.sharded_state_dict(model_state, is_loading, metadata=_CHECKPOINT_METADATA)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, path: Path) -> None:
        from megatron.core import dist_checkpointing

        path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state(is_loading=False), str(path))

    def load(self, path: Path) -> None:
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(self._sharded_state(is_loading=True), str(path))
        self.model.module.load_state_dict(loaded["model"])
        self.megatron_optimizer.load_state_dict(loaded["optimizer"])


def build(model: nn.Module, config, context) -> Engine:
    return MegatronEngine(model, config, context)
