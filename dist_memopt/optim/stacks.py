"""Which segments step together, and where their row/column statistics go.

Before the step's checks, every factored segment gets its statistic *slots* (views into the
reducer's buffers, named after the optimizer's :attr:`~dist_memopt.optim.base.FactoredOptimizer.
statistics`), in parameter order, so that the buffers' layout depends on global shapes only and is
the same on every rank. A whole segment of an unsharded parameter gets none: its sums are complete
where they are computed. After the checks, segments with the same geometry (view and place in it),
device, schedule and reduction are stacked (:class:`SegmentStack`) and stepped as one batch; a
stack's sums are scattered into its members' slots, so stacking changes no collective.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from dist_memopt.kernels.jobs import StatSlots
from dist_memopt.optim.plan import SegmentPlan, StepItem
from dist_memopt.shard.reduce import StatReducer, group_chain
from dist_memopt.shard.stacked import StackedGeometry

__all__ = ["Scratch", "SegmentWork", "SegmentStack", "StepWork", "reserve_statistics", "stack_segments", "local_weight", "local_grad", "state_view", "Side"]

#: a statistic's length: the view's "rows" or "cols", or a fixed count
Side = Union[str, int]


@dataclass(eq=False)
class SegmentWork:
    """One factored segment in this step: its schedule and its statistic slots."""

    item: StepItem
    seg: SegmentPlan
    sizes: dict[str, int]  # statistic name -> length, in the order they lie in the span
    ticket: Optional[int]  # the reducer ticket of all its statistics; None: the sums stay here
    span: Optional[Tensor] = None  # the ticket's slot, after allocate()
    schedule: Any = None

    @property
    def reduced(self) -> bool:
        return self.ticket is not None

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def slots(self) -> StatSlots:
        """Where the fused kernels write this segment's statistics: its span (after allocate())."""
        assert self.span is not None, "a fused segment's statistics have a reducer slot"
        return StatSlots(self.span, self.sizes)


def local_weight(work: SegmentWork) -> Tensor:
    """The segment's elements of its parameter's fp32 local weight (what an update writes)."""
    return work.seg.local(work.item.weight)


def local_grad(work: SegmentWork) -> Tensor:
    """The segment's elements of its parameter's fp32 local gradient."""
    return work.seg.local(work.item.grad)


def state_view(key: str, part: Callable[[SegmentPlan, Tensor], Tensor]) -> Callable[[SegmentWork], Tensor]:
    """The view of state ``key`` that ``part`` (``SegmentPlan.rows``, ``.cols``, ``.bits``, ...)
    slices out for a segment: what a stack gathers from and scatters back to."""
    return lambda work: part(work.seg, work.item.state[key])


def _length(side: Side, seg: SegmentPlan) -> int:
    geo = seg.geometry
    assert geo is not None
    return geo.rows if side == "rows" else geo.cols if side == "cols" else int(side)


def reserve_statistics(
    items: list[StepItem],
    statistics: Callable[[dict[str, Any]], dict[str, Side]],
    needs_slots: Callable[[StepItem, SegmentPlan], bool],
    reducer: StatReducer,
) -> list[SegmentWork]:
    """A :class:`SegmentWork` per factored segment, with one reducer slot for all its statistics
    where ``needs_slots`` (one span per segment: a stack moves its sums with one copy)."""
    works = []
    for item in items:
        names = statistics(item.group)
        for seg in item.plan.factored:
            sizes = {name: _length(side, seg) for name, side in names.items()}
            ticket = reducer.reserve(seg.group, sum(sizes.values()), item.weight.device) if needs_slots(item, seg) else None
            works.append(SegmentWork(item, seg, sizes, ticket))
    return works


class SegmentStack:
    """Segments stepped as one (B, numel) batch: same geometry, device, schedule and reduction.

    A stack of one works on views of the segment's own tensors; a larger one on stacked copies,
    written back with one foreach copy per tensor kind.
    """

    def __init__(self, works: list[SegmentWork]) -> None:
        self.works = works
        first = works[0]
        assert first.seg.geometry is not None
        self.geometry = StackedGeometry(first.seg.geometry, len(works))
        self.schedule = first.schedule
        self.chunk = first.item.chunk
        self.reduced = first.reduced
        self._sums: Optional[Tensor] = None  # (B, total): every statistic of every member
        self._gathered = False
        self._memo: dict[str, Tensor] = {}

    @property
    def count(self) -> int:
        return len(self.works)

    def gather(self, view: Callable[[SegmentWork], Tensor]) -> Tensor:
        """(B, ...) of every member's ``view``: the view itself for one member, else a stacked copy."""
        if self.count == 1:
            return view(self.works[0]).unsqueeze(0)
        return torch.stack([view(work) for work in self.works])

    def scatter(self, stacked: Tensor, view: Callable[[SegmentWork], Tensor]) -> None:
        """Write a gathered copy back into the members' ``view`` (nothing to do for one member)."""
        if self.count > 1:
            torch._foreach_copy_([view(work) for work in self.works], list(stacked.unbind(0)))

    def pieces(self, view: Callable[[SegmentWork], Tensor], lo: int, hi: int) -> list[Tensor]:
        """Every member's ``view[lo:hi]``: what an update writes in place (a larger stack steps in
        one chunk, whose ``[lo, hi)`` is all of it)."""
        if self.count == 1:
            return [view(self.works[0])[lo:hi]]
        assert lo == 0 and hi == self.geometry.numel, "a stack of several segments steps in one chunk"
        return [view(work) for work in self.works]

    def addcdiv_(self, view: Callable[[SegmentWork], Tensor], lo: int, hi: int, numerator: Tensor, denominator: Tensor, value: float) -> None:
        """``view[lo:hi] += value·numerator/denominator`` for every member, in place (one foreach op)."""
        torch._foreach_addcdiv_(self.pieces(view, lo, hi), list(numerator.unbind(0)), list(denominator.unbind(0)), value=value)

    def statistic(self, name: str) -> Tensor:
        """(B, size) accumulator of this step's partial sums of ``name``: the slot itself for one
        reduced member, else a view of one zeroed buffer for all statistics (see :meth:`publish`)."""
        if self._sums is None:
            first = self.works[0]
            if self.count == 1 and self.reduced:
                assert first.span is not None
                self._sums = first.span.unsqueeze(0)
            else:
                self._sums = torch.zeros(self.count, first.total, dtype=torch.float32, device=first.item.weight.device)
        return self._named(name)

    def publish(self) -> None:
        """Copy a reduced stack's sums into its members' slots, for the reduction to complete."""
        if self.reduced and self.count > 1 and self._sums is not None:
            torch._foreach_copy_([work.span for work in self.works], list(self._sums.unbind(0)))

    def complete(self, name: str) -> Tensor:
        """(B, size) complete sums: the local accumulator, or the slots once reduced."""
        if self.reduced and self.count > 1 and not self._gathered:
            self._sums = torch.stack([work.span for work in self.works])
            self._gathered = True
        return self._named(name)

    def _named(self, name: str) -> Tensor:
        """Statistic ``name``'s (B, size) piece of the sums (laid out as a member's slot)."""
        assert self._sums is not None
        view = StatSlots(self._sums, self.works[0].sizes).view(name)
        assert view is not None, f"no statistic {name!r}"
        return view

    def memo(self, key: str, make: Callable[[], Tensor]) -> Tensor:
        """A tensor computed once per step for this stack (a gathered copy both phases read)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


def stack_segments(works: list[SegmentWork], stackable: Callable[[SegmentWork], bool]) -> list[SegmentStack]:
    """Group ``works`` into stacks (one member each where not ``stackable``), in first-seen order,
    cut so that a stack's (B, numel) temporaries stay within the chunk size."""
    groups: dict[tuple, list[SegmentWork]] = defaultdict(list)
    for work in works:
        if stackable(work):
            chain = tuple(id(g) for g in group_chain(work.seg.group))
            key: tuple = (work.seg.geometry, work.item.weight.device, work.schedule, work.reduced, chain)
        else:
            key = (id(work),)
        groups[key].append(work)
    stacks = []
    for members in groups.values():
        geo = members[0].seg.geometry
        assert geo is not None
        per_stack = max(1, members[0].item.chunk // max(1, geo.numel))
        stacks += [SegmentStack(members[lo : lo + per_stack]) for lo in range(0, len(members), per_stack)]
    return stacks


class Scratch:
    """One flat buffer per role (and dtype, device), reused by every chunk of a step.

    A fresh chunk-sized temporary per op lets the CPU allocator return its pages to the system
    and fault them in again, a cost of the same order as the step's arithmetic; reused buffers
    are faulted in once. On accelerators the caching allocator already reuses blocks; the buffers
    take the memory the temporaries would.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat ``numel``-element view of the role's buffer (grown when too small); its values are
        left over from the last use: callers overwrite it."""
        key = (role, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


@dataclass(eq=False)
class StepWork:
    """What a subclass's update gets: the items with their schedules, the torch path's stacks, the
    segments of items that take the fused kernels (with ``fused``, their kernel step, every segment
    already added to it), and the step's scratch buffers."""

    items: list[StepItem]
    schedules: list[Any]
    stacks: list[SegmentStack]
    fused_works: list[SegmentWork]
    fused: Any = None
    scratch: Scratch = field(default_factory=Scratch)
    #: the torch path's segments, stacked once the checks passed (into ``stacks``)
    torch_works: list[SegmentWork] = field(default_factory=list)
    #: id(item) -> (key, numel, dtype) of the state it lacks, created once the checks passed
    missing: dict[int, list[tuple[str, int, torch.dtype]]] = field(default_factory=dict)
    #: the StatReducer whose slots the works write
    reducer: Any = None
    #: the step counts the schedules were built at, in the items' order
    counts: Optional[list[int]] = None
