"""Complete partial row/column statistics with one all_reduce per process group.

During a step every segment asks for *slots*: views into one flat fp32 buffer per process group
(``None`` = no communication). Each rank writes its partial sums into its slots; a single
all_reduce(SUM) per group then completes all of them at once, whatever the number of parameters.
The buffer layout depends only on global shapes, so it is identical on every rank, and ranks with
empty shards contribute zeros instead of skipping the collective.

A parameter divided over several mesh dimensions (data × tensor parallel) names a *chain* of
groups, one per dimension: summing over each in turn sums over all holders of its pieces, with no
new process group to create. Each distinct chain is one buffer and one collective per group in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dist_memopt.shard import running

__all__ = ["StatReducer", "MAX_BUCKET_NUMEL", "group_chain"]

# One collective carries at most this many floats (1 GiB); only a model with billions of rows and
# columns in one group needs a second bucket.
MAX_BUCKET_NUMEL = 1 << 28


Chain = tuple  # of ProcessGroups


def group_chain(group: Optional[dist.ProcessGroup | Chain]) -> Chain:
    """A shard's ``group`` as a chain: () for None, (group,) for one process group."""
    if group is None:
        return ()
    return tuple(group) if isinstance(group, tuple) else (group,)


@dataclass
class _GroupBuffer:
    chain: Chain
    device: torch.device
    sizes: list[int] = field(default_factory=list)
    total: int = 0
    buffer: Optional[Tensor] = None
    works: list = field(default_factory=list)


class StatReducer:
    """Plans slots, then reduces them; once per step (or again after :meth:`renew`).

    Usage: ``ticket = reducer.reserve(group, n, device)`` for every statistic vector, then
    ``reducer.allocate()``, ``reducer.slot(ticket)`` to write partial sums, and
    ``reducer.reduce(async_op)``; after ``wait()`` the slots hold the complete sums. ``renew()``
    makes it ready for another step with the same slots.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[tuple[int, ...], torch.device], _GroupBuffer] = {}
        self._tickets: list[tuple[tuple[tuple[int, ...], torch.device], int, int]] = []  # (key, offset, size)
        self._allocated = False

    def reserve(self, group: Optional[dist.ProcessGroup | Chain], size: int, device: torch.device) -> int:
        """A slot of ``size`` floats completed over ``group`` (a process group, a chain, or None)."""
        if self._allocated:
            raise RuntimeError("reserve() after allocate()")
        chain = group_chain(group)
        key = (tuple(id(g) for g in chain), device)
        buf = self._buffers.setdefault(key, _GroupBuffer(chain, device))
        offset = buf.total
        buf.sizes.append(size)
        buf.total += size
        self._tickets.append((key, offset, size))
        return len(self._tickets) - 1

    def allocate(self) -> None:
        for buf in self._buffers.values():
            buf.buffer = torch.zeros(buf.total, dtype=torch.float32, device=buf.device)
        self._allocated = True

    def renew(self) -> "StatReducer":
        """This reducer for another step with the same slots: its buffers zeroed and kept, so the
        slots' views and addresses stay valid (the previous step's reduction must be complete)."""
        assert self._allocated, "allocate() first"
        for buf in self._buffers.values():
            assert not buf.works, "the previous reduction is still running"
            assert buf.buffer is not None
            buf.buffer.zero_()
        return self

    def slot(self, ticket: int) -> Tensor:
        key, offset, size = self._tickets[ticket]
        buffer = self._buffers[key].buffer
        assert buffer is not None, "allocate() first"
        return buffer[offset : offset + size]

    def fingerprints(self) -> dict[int, int]:
        """Per process group (by id), a hash of the slot sizes: equal on ranks that agree."""
        result: dict[int, int] = {}
        for buf in self._buffers.values():
            for position, group in enumerate(buf.chain):
                key = id(group)
                result[key] = hash((result.get(key, 0), position, len(buf.chain), tuple(buf.sizes))) % (1 << 52)
        return result

    @property
    def groups(self) -> list[dist.ProcessGroup]:
        """Every distinct process group a buffer is reduced over."""
        seen: dict[int, dist.ProcessGroup] = {}
        for buf in self._buffers.values():
            for group in buf.chain:
                seen.setdefault(id(group), group)
        return list(seen.values())

    def reduce(self, async_op: bool = False) -> None:
        """Sum every buffer over its chain: one collective per group of the chain (and bucket).

        In a chain, each sum needs the previous one complete, so only the last is left running
        with ``async_op``, and held by :mod:`~dist_memopt.shard.running` as well as here.
        """
        running.release_completed()
        for buf in self._buffers.values():
            if not buf.chain or buf.buffer is None:
                continue
            for position, group in enumerate(buf.chain):
                last = position == len(buf.chain) - 1
                for chunk in buf.buffer.split(MAX_BUCKET_NUMEL):
                    work = dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=group, async_op=async_op and last)
                    if async_op and last:
                        buf.works.append(work)
                        running.hold(work, chunk)

    def wait(self) -> None:
        for buf in self._buffers.values():
            for work in buf.works:
                work.wait()
            buf.works.clear()

    def nbytes(self) -> int:
        """Bytes held by the buffers (kept alive between steps while a reduction is pending)."""
        return sum(b.buffer.numel() * 4 for b in self._buffers.values() if b.buffer is not None)

    def communicated_bytes(self) -> int:
        """Bytes this rank contributes to collectives in this step (once per group of a chain)."""
        return sum(b.buffer.numel() * 4 * len(b.chain) for b in self._buffers.values() if b.buffer is not None)
