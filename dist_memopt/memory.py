"""How much optimizer state a process holds, counted from the real tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dist_memopt.shard.spec import local_tensor

__all__ = ["state_bytes"]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this process holds (what the papers call optimizer memory).

    Sums the storage of every tensor in ``optimizer.state`` (a DTensor counts its local shard;
    tensors sharing a storage count once). Works for any ``torch.optim.Optimizer``. Not included:
    the communication buffer an SMMF step leaves in flight on sharded parameters until the next
    step completes it (the size of the row/column sums; see ``optimizer.pending_bytes()``).
    """
    seen: set[tuple[torch.device, int]] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, Tensor):
            local = local_tensor(value)
            storage = local.untyped_storage()
            key = (local.device, storage.data_ptr())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for param_state in optimizer.state.values():
        visit(param_state)
    return total
