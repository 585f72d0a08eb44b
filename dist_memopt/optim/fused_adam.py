"""SMMF's per-element step through torch's fused Adam kernel, one pass instead of five.

Once SMMF has decompressed last step's moments, what it does per element is Adam's update without
bias correction: M ← β1·M + (1 − β1)·G, V ← β2·V + (1 − β2)·G², W ← W − lr·M/(√V + eps), with
coupled weight decay G ← G + wd·W first when asked. ``torch._fused_adam_`` (the kernel behind
``torch.optim.Adam(fused=True)``) does that in one pass over W, G, M and V; the eager ops take
five (two multiply-adds, a sqrt, an add and a divide). Its bias corrections are 1 − β^step; the
step count passed is +inf, so both are exactly 1 for every β in [0, 1) (SMMF's β1 and β2,t).

On a device without the fused op, :func:`eager_adam_step` does the same with foreach ops; the
two agree to the last bit or two. The CPU kernel steps the last few elements of each thread's share
in scalar code, which rounds V's multiply-add differently: which elements those are depends on the
lengths passed and the thread count, so a rerun with another ``torch.get_num_threads()`` may differ
in the last bit (as torch's own CPU reductions may); a rerun with the same one is bit-identical.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["fused_adam_available", "fused_adam_step", "eager_adam_step"]

#: device types whose fused Adam kernel the suite runs against the eager ops (CUDA: the CUDA tier)
_FUSED_DEVICES = ("cpu", "cuda")
_INFINITE_STEPS: dict[torch.device, Tensor] = {}


def fused_adam_available(device: torch.device) -> bool:
    return device.type in _FUSED_DEVICES and hasattr(torch, "_fused_adam_")


def _infinite_step(device: torch.device) -> Tensor:
    if device not in _INFINITE_STEPS:
        _INFINITE_STEPS[device] = torch.tensor(float("inf"), dtype=torch.float32, device=device)
    return _INFINITE_STEPS[device]


def fused_adam_step(
    weights: list[Tensor], grads: list[Tensor], firsts: list[Tensor], seconds: list[Tensor],
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
) -> None:
    """In place: ``firsts`` (M) and ``seconds`` (V) from the decompressed moments, then the weights.

    Every tensor fp32 and contiguous (the kernel walks raw pointers); ``weight_decay`` is coupled
    (added to the gradient, which stays unchanged in memory).
    """
    for tensors in (weights, grads, firsts, seconds):
        for tensor in tensors:
            if tensor.dtype != torch.float32 or not tensor.is_contiguous():
                raise ValueError(f"fused Adam takes contiguous fp32 tensors (it walks raw pointers), got {tensor.dtype}, strides {tensor.stride()}")
    step = _infinite_step(weights[0].device)
    torch._fused_adam_(
        weights, grads, firsts, seconds, [], [step] * len(weights),
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
    )


def eager_adam_step(
    weights: list[Tensor], grads: list[Tensor], firsts: Optional[list[Tensor]], seconds: list[Tensor], denominators: list[Tensor],
    *, lr: float, beta1: Optional[float], beta2: float, eps: float,
) -> None:
    """:func:`fused_adam_step` in foreach ops, or without a first moment (``firsts`` None: the
    numerator is the gradient). ``seconds`` come in as β2·V (a caller folds β2 into a factor for
    free) and ``grads`` with any coupled decay added; ``denominators`` are buffers for √V + eps,
    which keep V intact for its sums."""
    torch._foreach_addcmul_(seconds, grads, grads, value=1.0 - beta2)
    numerators = grads
    if firsts is not None:
        assert beta1 is not None
        torch._foreach_lerp_(firsts, grads, 1.0 - beta1)
        numerators = firsts
    for denominator, second in zip(denominators, seconds):
        torch.sqrt(second, out=denominator)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(weights, numerators, denominators, value=-lr)
