"""AwkwardModel inside Megatron-core's DDP and optimizers, and the single-process runs to compare with.

Shared by the CPU (gloo) tests and the CUDA test. Every rank trains on the same batches, so the
data-parallel average of the gradients is the single-process gradient up to rounding.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

import dist_memopt as dm
from models import AwkwardModel, batch

OPTIMIZERS = {
    # name: (OptimizerConfig fields, keyword arguments of get_megatron_optimizer)
    "smmf-adamw": (dict(optimizer="smmf", weight_decay=0.1), {}),
    "smmf-adam": (dict(optimizer="smmf", weight_decay=0.1, decoupled_weight_decay=False), {}),
    "smmf-no-first-moment": (dict(optimizer="smmf", weight_decay=0.0), dict(beta=None)),
    "alada": (dict(optimizer="alada", weight_decay=0.05, adam_beta2=0.9), dict(eps=1e-16)),
}
LR = 1e-2
CLIP = 0.5  # below the gradient norms of the first steps: Megatron's clipping is active


def reference_optimizer(name: str, params: list) -> torch.optim.Optimizer:
    """The single-process optimizer that ``OPTIMIZERS[name]`` builds inside Megatron."""
    fields, kwargs = OPTIMIZERS[name]
    wd = fields["weight_decay"]
    if fields["optimizer"] == "smmf":
        mode = "adam" if fields.get("decoupled_weight_decay") is False else "adamw"
        return dm.SMMF(params, lr=LR, weight_decay=wd, weight_decay_mode=mode, **kwargs)
    return dm.Alada(params, lr=LR, weight_decay=wd, betas=(0.9, fields["adam_beta2"]), **kwargs)


def init_parallel(tensor_parallel: int = 1) -> None:
    from megatron.core import parallel_state

    from dist_memopt.integrations.megatron.cpu_shims import install_cpu_shims

    install_cpu_shims()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_parallel, 1)


def transformer_config(dtype: torch.dtype = torch.float32) -> Any:
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
    )


def megatron_model(dtype: torch.dtype = torch.float32, device: str = "cpu", expert_param: bool = False) -> nn.Module:
    """AwkwardModel as a MegatronModule (its default sharded_state_dict: replicated parameters)."""
    from megatron.core.transformer.module import MegatronModule

    class AwkwardMegatron(MegatronModule):
        def __init__(self) -> None:
            super().__init__(transformer_config(dtype))
            torch.manual_seed(0)
            self.inner = AwkwardModel().to(device=device, dtype=dtype)
            if expert_param:  # Megatron's mark of an expert-parallel parameter: its own buffers and group
                self.inner.head.weight.allreduce = False

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.inner(x, z)

    return AwkwardMegatron()


def wrap_ddp(model: nn.Module, distributed_optimizer: bool = True, bucket_size: Optional[int] = 700) -> nn.Module:
    """Megatron DDP; ``bucket_size`` (with overlap_grad_reduce) splits the parameters into buckets."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bucket_size is not None,
        bucket_size=bucket_size,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def optimizer_config(name: str, distributed_optimizer: bool = True, **fields: Any) -> Any:
    from megatron.core.optimizer import OptimizerConfig

    base, _ = OPTIMIZERS[name]
    return OptimizerConfig(lr=LR, clip_grad=CLIP, use_distributed_optimizer=distributed_optimizer, **{**base, **fields})


def loss(model: nn.Module, step: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    x, z, y = (t.to(device=device, dtype=dtype) for t in batch(step))
    return (model(x, z).float() - y.float()).pow(2).mean()


def train_megatron(ddp: nn.Module, optimizer: Any, steps: range, dtype: torch.dtype = torch.float32, device: str = "cpu", nan_step: Optional[int] = None) -> list:
    """Megatron-LM's train step: zero buffers, backward, finish the grad sync, optimizer.step()."""
    results = []
    for step in steps:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        value = loss(ddp, step, dtype, device)
        if step == nan_step:
            value = value * float("nan")
        optimizer.scale_loss(value).backward()
        ddp.finish_grad_sync()
        results.append(optimizer.step())
    return results


def train_reference(name: str, steps: int, dtype: torch.dtype = torch.float32, device: str = "cpu", nan_step: Optional[int] = None) -> tuple[dict, list]:
    """One process: fp32 master weights stepped by ``name``, clipped like Megatron, copied to ``dtype``.

    Returns the master weights and the gradient norms before clipping.
    """
    torch.manual_seed(0)
    model = AwkwardModel().to(device=device, dtype=dtype)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    optimizer = reference_optimizer(name, masters)
    norms = []
    for step in range(steps):
        model.zero_grad()
        loss(model, step, dtype, device).backward()
        if step == nan_step:
            norms.append(None)
            continue
        for master, p in zip(masters, model.parameters()):
            master.grad = p.grad.float()
        norms.append(torch.nn.utils.clip_grad_norm_(masters, CLIP).item())
        optimizer.step()
        with torch.no_grad():
            for master, p in zip(masters, model.parameters()):
                p.copy_(master)
    return {n: m.detach().cpu() for (n, _), m in zip(model.named_parameters(), masters)}, norms


def model_weights_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` with the names of the plain AwkwardModel."""
    return [(n.removeprefix("module.").removeprefix("inner."), p) for n, p in model.named_parameters()]


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model_weights_named(model)}


def main_weights(ddp: nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """The fp32 main weights, gathered from each rank's shards (bf16 runs keep them apart)."""
    import torch.distributed as dist

    from dist_memopt.shard.spec import layout_of

    device = next(ddp.parameters()).device
    full = {n: torch.zeros(p.numel(), device=device) for n, p in model_weights(ddp).items()}
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for name, tensor in zip(group["param_names"], group["params"]):
                spec = layout_of(tensor).segments[0].spec
                full[name.removeprefix("module.").removeprefix("inner.")][spec.start : spec.end] = tensor.detach().float()
    for value in full.values():
        dist.all_reduce(value)
    return {n: full[n].cpu().view(p.shape) for n, p in model_weights(ddp).items()}


def _inner_optimizers(optimizer: Any) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer]) if o.optimizer is not None]
