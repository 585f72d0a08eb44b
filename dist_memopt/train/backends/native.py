"""PyTorch's own engines: FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel``) and DDP.

Under FSDP each transformer layer is its own unit and the root holds embeddings and heads. Our
optimizers take ``model.parameters()`` of the wrapped model as any torch optimizer does (FSDP2
hands them DTensors, FSDP1 flat-parameter views). DDP replicates whole parameters: the backend
for optimizers that only handle whole tensors (torch's Adafactor, CAME, SM3).

Checkpoints use torch.distributed.checkpoint (DCP) with ``get_state_dict``/``set_state_dict``, for
our optimizers as for torch's: SMMF and Alada hand DCP their per-element state as DTensors placed
like the parameters under FSDP2, and in FSDP1's own form under FSDP1 (see
:mod:`dist_memopt.optim.checkpoint`), so a checkpoint loads on another number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_memopt.train.backends.base import Engine, make_optimizer, no_decay_names

__all__ = ["FSDP2Engine", "FSDP1Engine", "DDPEngine", "build"]

_FSDP1_PREFIX = "_fsdp_wrapped_module."


def _transformer_layer_type() -> type:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return TransformerLayer


class _DCPEngine(Engine):
    """Shared: gradient clipping and DCP checkpoints of model and optimizer."""

    clip: float

    def _clip(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)

    def step(self) -> None:
        self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class FSDP2Engine(_DCPEngine):
    def __init__(self, model: nn.Module, config, device: torch.device) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        no_decay = no_decay_names(model)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if config.train.bf16 else MixedPrecisionPolicy()
        reshard = config.parallel.reshard_after_forward
        layer_type = _transformer_layer_type()
        for module in model.modules():
            if isinstance(module, layer_type):
                fully_shard(module, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
        self.model = model
        self.clip = config.train.clip_grad
        self.optimizer = make_optimizer(config, model.named_parameters(), no_decay)

    def backward(self, loss: torch.Tensor, last_micro: bool, num_micro: int) -> None:
        self.model.set_requires_gradient_sync(last_micro)
        (loss / num_micro).backward()


class _NoSyncEngine(_DCPEngine):
    """Gradient accumulation the FSDP1/DDP way: skip the reduction inside ``no_sync()``."""

    def backward(self, loss: torch.Tensor, last_micro: bool, num_micro: int) -> None:
        if last_micro:
            (loss / num_micro).backward()
        else:
            with self.model.no_sync():
                (loss / num_micro).backward()


class FSDP1Engine(_NoSyncEngine):
    def __init__(self, model: nn.Module, config, device: torch.device) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        no_decay = no_decay_names(model)
        precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if config.train.bf16 else None
        self.model = FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({_transformer_layer_type()}),
            use_orig_params=config.parallel.use_orig_params,
            mixed_precision=precision,
            device_id=device,
        )
        self.clip = config.train.clip_grad
        named = ((n.replace(_FSDP1_PREFIX, ""), p) for n, p in self.model.named_parameters())
        if not config.parallel.use_orig_params:  # flat parameters: one group, decay for all
            no_decay = set()
        self.optimizer = make_optimizer(config, named, no_decay)

    def _clip(self) -> None:
        if self.clip > 0:
            self.model.clip_grad_norm_(self.clip)


class DDPEngine(_NoSyncEngine):
    def __init__(self, model: nn.Module, config, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        no_decay = no_decay_names(model)
        self.model = DDP(model, device_ids=[device] if device.type == "cuda" else None)
        self.clip = config.train.clip_grad
        named = ((n.removeprefix("module."), p) for n, p in self.model.named_parameters())
        self.optimizer = make_optimizer(config, named, no_decay)


_ENGINES = {"fsdp2": FSDP2Engine, "fsdp1": FSDP1Engine, "ddp": DDPEngine}


def build(model: nn.Module, config, context) -> Engine:
    return _ENGINES[config.parallel.backend](model, config, context.device)
