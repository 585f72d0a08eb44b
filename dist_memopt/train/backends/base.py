"""What the training loop needs from a backend, whatever wraps the model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from dist_memopt.memory import state_bytes
from dist_memopt.shard.spec import local_tensor
from dist_memopt.train import optimizers

__all__ = ["Engine", "no_decay_names", "make_optimizer"]


def no_decay_names(model: nn.Module) -> set[str]:
    """Megatron's rule, decided on the unwrapped model: no weight decay for biases and 1-D tensors."""
    return {n for n, p in model.named_parameters() if n.endswith(".bias") or p.dim() == 1}


def make_optimizer(config, named_params: Iterable[tuple[str, nn.Parameter]], no_decay: set[str]) -> torch.optim.Optimizer:
    groups = optimizers.param_groups(named_params, config.train.weight_decay, no_decay)
    return optimizers.build_optimizer(config.optimizer.type, config.optimizer.params, groups, config.train.lr)


class Engine(ABC):
    """A wrapped model and its optimizer: :meth:`train_step` runs one iteration (by default
    forward and :meth:`backward` per micro-batch, then one :meth:`step`).

    ``optimizer`` is the user-level optimizer (ours or a baseline): its ``param_groups`` carry the
    learning rate and its ``state`` is what :meth:`state_bytes` counts.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]], kind: str, num_micro: int) -> Optional[torch.Tensor]:
        """One iteration: forward/backward of ``num_micro`` micro-batches from ``batches``, then the
        step. Returns the mean of the micro-batches' losses where this rank computes the loss (None
        on pipeline stages before the last)."""
        from dist_memopt.train.models import compute_loss

        total = None
        for micro, batch in enumerate(batches):
            loss = compute_loss(self, kind, batch)
            self.backward(loss, micro == num_micro - 1, num_micro)
            total = loss.detach() if total is None else total + loss.detach()
        self.step()
        return total / num_micro

    # the default train_step's two halves (an engine that replaces train_step needs neither)

    def backward(self, loss: torch.Tensor, last_micro: bool, num_micro: int) -> None:
        """Backpropagate one micro-batch's mean loss; gradients average over micro-batches."""
        raise NotImplementedError

    def step(self) -> None:
        """Clip (``train.clip_grad``), step the optimizer, clear gradients."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers that step this rank's parameters (Megatron's are inside its wrapper)."""
        return [self.optimizer]

    def state_bytes(self) -> int:
        return sum(state_bytes(optimizer) for optimizer in self.optimizers())

    def finish(self) -> None:
        """Complete the reductions SMMF leaves in flight after its last step, so the optimizer's
        factors are final and no collective is running when the process group is destroyed."""
        from dist_memopt.optim.base import FactoredOptimizer

        for optimizer in self.optimizers():
            if isinstance(optimizer, FactoredOptimizer):
                optimizer.synchronize()

    def local_numel(self) -> int:
        """Elements this rank's optimizer steps on (AdamW would keep 8 bytes for each)."""
        return sum(local_tensor(p).numel() for o in self.optimizers() for g in o.param_groups for p in g["params"])

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model and optimizer state under ``path`` (a directory; collective)."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what :meth:`save` wrote (collective)."""
