"""Shared pieces of the DeepSpeed tests: model, data, configs, and single-process references.

Data: rank ``r`` trains on its own batch at every step, and the single-process reference steps on
the mean of the ranks' losses. DeepSpeed averages the ranks' gradients, and the gradient of a mean
of losses is the mean of their gradients, so both optimizers see the same gradient up to float
summation order (~1e-7 relative), while a bug that used one rank's gradient would show.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from models import AwkwardModel, batch

DS_ENV = {"DS_ACCELERATOR": "cpu"}
OPTIMIZER_PARAMS = {"SMMF": {"lr": 1e-2, "weight_decay": 0.1}, "Alada": {"lr": 1e-2, "betas": [0.9, 0.95]}}


def ds_model() -> nn.Module:
    """AwkwardModel with its scalar as shape (1,): DeepSpeed 0.19.8's ``_broadcast_model`` views
    every parameter as bytes, which fails for 0-d tensors, so DeepSpeed cannot hold a 0-d one."""
    torch.manual_seed(0)
    model = AwkwardModel()
    model.scale = nn.Parameter(torch.ones(1))
    return model


def rank_loss(model: nn.Module, step: int, rank: int, micro: int = 0) -> Tensor:
    """The loss rank ``rank`` computes at ``step`` (micro-batch ``micro``), in the model's dtype."""
    x, z, y = batch(step * 64 + micro * 8 + rank)
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype), z.to(dtype)).float() - y).pow(2).mean()


def ds_config(stage: int, optimizer: Optional[str] = None, **extra: Any) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 by default; the references do not
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
    }
    if optimizer is not None:
        config["optimizer"] = {"type": optimizer, "params": OPTIMIZER_PARAMS[optimizer]}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def make_optimizer(name: str, params: Iterable) -> torch.optim.Optimizer:
    import dist_memopt as dm

    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in OPTIMIZER_PARAMS[name].items()}
    return getattr(dm, name)(params, **kwargs)


def reference_run(
    name: str,
    world_sizes: list[int],
    *,
    accumulation: int = 1,
    clip: float = 0.0,
    scheduler: Optional[Callable[[torch.optim.Optimizer], Any]] = None,
    dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | Sequence[torch.dtype] = torch.float32,
    fresh_state_at: Optional[int] = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The optimizer stepping the plain model, one step per entry of ``world_sizes`` (the data of
    that many ranks), on the mean gradient of the ranks' (and micro-batches') losses.

    With ``dtype`` bf16 the forward/backward run on a bf16 copy of the fp32 master weights, as
    DeepSpeed's mixed precision does (ZeRO copies its fp32 master weights from the bf16-cast
    model), and each rank's gradient is averaged in fp32. ``grad_dtype`` bf16 rounds the averaged gradient to
    bf16, as ZeRO does when it keeps gradients in bf16 (one dtype, or one per step). ``fresh_state_at`` restarts the optimizer
    (state lost, weights kept) before that step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the ranks; tiny ops on a shared 2-core machine are faster so
    try:
        return _reference_run(name, world_sizes, accumulation, clip, scheduler, dtype, grad_dtype, fresh_state_at)
    finally:
        torch.set_num_threads(threads)


def _reference_run(name, world_sizes, accumulation, clip, scheduler, dtype, grad_dtype, fresh_state_at):
    master = ds_model()
    lowp = master
    if dtype != torch.float32:
        lowp = copy.deepcopy(master).to(dtype)
        master = copy.deepcopy(lowp).float()
    optimizer = make_optimizer(name, master.parameters())
    sched = scheduler(optimizer) if scheduler else None
    for step, world in enumerate(world_sizes):
        if step == fresh_state_at:
            optimizer = make_optimizer(name, master.parameters())
        grads = [torch.zeros_like(p) for p in master.parameters()]
        if lowp is not master:
            with torch.no_grad():
                for low, p in zip(lowp.parameters(), master.parameters()):
                    low.copy_(p)
        for rank in range(world):
            for micro in range(accumulation):
                lowp.zero_grad()
                rank_loss(lowp, step, rank, micro).backward()
                for g, p in zip(grads, lowp.parameters()):
                    g += p.grad.float()
        for g, p in zip(grads, master.parameters()):
            rounding = grad_dtype if isinstance(grad_dtype, torch.dtype) else grad_dtype[step]
            p.grad = (g / (world * accumulation)).to(rounding).float()
        if clip:
            torch.nn.utils.clip_grad_norm_(master.parameters(), clip)
        optimizer.step()
        if sched is not None:
            sched.step()
    return master, optimizer


def max_relative_diff(full: dict[str, Tensor], reference: nn.Module) -> dict[str, float]:
    """Per parameter: max |a − b| divided by the parameter's scale (max |b|, at least 1)."""
    out = {}
    for name, p in reference.named_parameters():
        scale = max(1.0, p.detach().abs().max().item())
        out[name] = (full[name].float() - p.detach()).abs().max().item() / scale
    return out
