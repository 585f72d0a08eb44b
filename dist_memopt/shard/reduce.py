"""Complete partial row/column statistics with one all_reduce per process group.

During a step every segment asks for *slots*: views into one flat fp32 buffer per process group
(``None`` = no communication). Each rank writes its partial sums into its slots; a single
all_reduce(SUM) per group then completes all of them at once, whatever the number of parameters.
The buffer layout depends only on global shapes, so it is identical on every rank, and ranks with
empty shards contribute zeros instead of skipping the collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["StatReducer", "MAX_BUCKET_NUMEL"]

# One collective carries at most this many floats (1 GiB); only a model with billions of rows and
# columns in one group needs a second bucket.
MAX_BUCKET_NUMEL = 1 << 28


@dataclass
class _GroupBuffer:
    group: Optional[dist.ProcessGroup]
    device: torch.device
    sizes: list[int] = field(default_factory=list)
    total: int = 0
    buffer: Optional[Tensor] = None
    works: list = field(default_factory=list)


class StatReducer:
    """Plans slots, then reduces them; usable once per step.

    Usage: ``ticket = reducer.reserve(group, n, device)`` for every statistic vector, then
    ``reducer.allocate()``, ``reducer.slot(ticket)`` to write partial sums, and
    ``reducer.reduce(async_op)``; after ``wait()`` the slots hold the complete sums.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.device], _GroupBuffer] = {}
        self._tickets: list[tuple[tuple[int, torch.device], int, int]] = []  # (key, offset, size)
        self._allocated = False

    def reserve(self, group: Optional[dist.ProcessGroup], size: int, device: torch.device) -> int:
        if self._allocated:
            raise RuntimeError("reserve() after allocate()")
        key = (0 if group is None else id(group), device)
        buf = self._buffers.setdefault(key, _GroupBuffer(group, device))
        offset = buf.total
        buf.sizes.append(size)
        buf.total += size
        self._tickets.append((key, offset, size))
        return len(self._tickets) - 1

    def allocate(self) -> None:
        for buf in self._buffers.values():
            buf.buffer = torch.zeros(buf.total, dtype=torch.float32, device=buf.device)
        self._allocated = True

    def slot(self, ticket: int) -> Tensor:
        key, offset, size = self._tickets[ticket]
        buffer = self._buffers[key].buffer
        assert buffer is not None, "allocate() first"
        return buffer[offset : offset + size]

    def fingerprints(self) -> dict[int, int]:
        """Per process group (by id), a hash of the slot sizes: equal on ranks that agree."""
        result: dict[int, int] = {}
        for buf in self._buffers.values():
            if buf.group is not None:
                key = id(buf.group)
                result[key] = hash((result.get(key, 0), tuple(buf.sizes))) % (1 << 52)
        return result

    @property
    def groups(self) -> list[dist.ProcessGroup]:
        return [b.group for b in self._buffers.values() if b.group is not None]

    def reduce(self, async_op: bool = False) -> None:
        """Sum every group's buffer over its ranks: one collective per group (and bucket)."""
        for buf in self._buffers.values():
            if buf.group is None or buf.buffer is None:
                continue
            for chunk in buf.buffer.split(MAX_BUCKET_NUMEL):
                work = dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=buf.group, async_op=async_op)
                if async_op:
                    buf.works.append(work)

    def wait(self) -> None:
        for buf in self._buffers.values():
            for work in buf.works:
                work.wait()
            buf.works.clear()

    def nbytes(self) -> int:
        """Bytes held by the buffers (kept alive between steps while a reduction is pending)."""
        return sum(b.buffer.numel() * 4 for b in self._buffers.values() if b.buffer is not None)

    def communicated_bytes(self) -> int:
        """Bytes this rank contributes to collectives in this step."""
        return sum(
            b.buffer.numel() * 4 for b in self._buffers.values() if b.buffer is not None and b.group is not None
        )
