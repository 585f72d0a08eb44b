"""The training-loop contract of Alada's ``momentum_in_grad`` mode, checked before each step.

In that mode ``.grad`` *is* the first moment: ``optimizer.zero_grad()`` decays it by β1 and
backward adds (1 − β1)·G into the same tensor. A loop that clears gradients itself
(``model.zero_grad()``, as trainers commonly do), or that replaces the ``.grad`` tensors, destroys the
momentum without any error; this guard turns both into a clear error before any state changes.
Rewrites *in place* (clipping, unscaling) cannot be told from backward's own accumulation and are
documented instead; so is a view swapped in for ``.grad`` (DDP's bucket views copy the values first).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

from torch import Tensor

__all__ = ["GradContract", "LOOP_CONTRACT"]

LOOP_CONTRACT = (
    "the loop must call optimizer.zero_grad() (which decays the momentum held in .grad by beta1), "
    "then optimizer.scale_loss(loss).backward(), then optimizer.step(), and must not clear, replace, "
    "clip or rescale .grad in between. Training loops that manage gradients themselves (clearing "
    "them with model.zero_grad(), clipping them, never scaling the loss: most trainers) cannot keep "
    "the momentum there: use momentum_in_grad=False (the default; M is then optimizer state)"
)


class GradContract:
    """Remembers the ``.grad`` tensors ``zero_grad`` left, and whether it ran since the last step."""

    def __init__(self) -> None:
        self.zeroed = False
        self._grads: dict[int, Callable[[], Optional[Tensor]]] = {}

    def record(self, param: Tensor) -> None:
        """Called by ``zero_grad`` for each parameter after it decayed (or created) ``param.grad``."""
        self._grads[id(param)] = weakref.ref(param.grad) if param.grad is not None else (lambda: None)

    def check(self, kind: str, groups: list[dict[str, Any]], name: Callable[[dict, int], str]) -> None:
        """RuntimeError naming the broken part of the contract, if any; then re-arm for the next step."""
        in_grad = [g for g in groups if g["momentum_in_grad"]]
        if not in_grad:
            return
        if not self.zeroed:
            if not self._grads and all(float(g["lr"]) == 0 for g in in_grad):
                # a fresh optimizer's step at lr 0 moves no weight: torch.distributed.checkpoint's
                # get_state_dict takes one on zero gradients to create the state it loads into
                return
            raise RuntimeError(
                f"{kind}(momentum_in_grad=True): step() without optimizer.zero_grad() since the "
                f"{'last step' if self._grads else 'start'} (was .grad cleared by model.zero_grad() or "
                f"a trainer?); no parameter or state was changed. In this mode {LOOP_CONTRACT}"
            )
        for group in in_grad:
            for i, p in enumerate(group["params"]):
                expected = self._grads.get(id(p))
                if expected is None or not _same_buffer(expected(), p.grad, p):
                    raise RuntimeError(
                        f"{kind}(momentum_in_grad=True): the .grad of {name(group, i)} is not the tensor "
                        "optimizer.zero_grad() left there (it was set to None or replaced since); no "
                        f"parameter or state was changed. In this mode {LOOP_CONTRACT}"
                    )
        self.zeroed = False


def _same_buffer(left: Optional[Tensor], grad: Optional[Tensor], param: Tensor) -> bool:
    """``grad`` is the tensor ``zero_grad`` left, or a view of the parameter's shape that a
    framework swapped in for it after copying its values (DDP's ``gradient_as_bucket_view`` does
    so when it builds its buckets; the old tensor may be gone by now)."""
    if grad is left:
        return True
    return grad is not None and grad._is_view() and grad.shape == param.shape
