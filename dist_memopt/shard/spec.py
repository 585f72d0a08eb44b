"""Shard descriptions: where each logical parameter's elements lie on this rank.

An optimizer tensor (what sits in ``param_groups``) holds, in its local data, one or more
*segments*: pieces of logical parameters (an FSDP1 FlatParameter or a ZeRO partition holds many; a
DTensor shard or a plain tensor holds one). A segment says which global flat positions of which
global shape it holds, and over which process groups the parameter is divided. That is all the
optimizer math needs; framework adapters only produce these descriptions.

The positions are one contiguous range of the row-major flattening for data-parallel shards, and
*runs* for tensor-parallel ones: a row-wise layer's column block is ``rows`` runs of ``cols``
elements, one global row apart (:class:`Run`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from dist_memopt.shard.reduce import group_chain

__all__ = [
    "Run",
    "cut_runs",
    "window_runs",
    "ShardSpec",
    "Segment",
    "ParamLayout",
    "local_tensor",
    "grad_like_param",
    "set_layout",
    "declare_layout",
    "declared_layout",
    "layout_of",
    "register_layout_resolver",
]

ProcessGroup = dist.ProcessGroup


GroupChain = tuple  # of ProcessGroups: a sum over each in turn is the sum over their product


@dataclass(frozen=True)
class Run:
    """``count`` runs of ``length`` consecutive global flat positions, the i-th at ``start + i·stride``.

    A run group lists its elements run by run, in the order the local data holds them.
    """

    start: int
    length: int
    stride: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.length < 1 or self.count < 1 or self.start < 0:
            raise ValueError(f"invalid run {self}: start >= 0, length >= 1 and count >= 1 are needed")
        if self.count > 1 and self.stride < self.length:
            raise ValueError(f"runs of {self} overlap (stride below length)")

    @property
    def numel(self) -> int:
        return self.length * self.count

    @property
    def last(self) -> int:
        """One past the last position."""
        return self.start + (self.count - 1) * self.stride + self.length

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """Every global flat position, in local order (computed when a run must be gathered)."""
        starts = self.start + self.stride * torch.arange(self.count, device=device)
        return (starts.unsqueeze(1) + torch.arange(self.length, device=device)).view(-1)


def window_runs(runs: Sequence[Run], lo: int, hi: int) -> Iterator[tuple[Run, bool]]:
    """The pieces of local elements ``[lo, hi)`` of ``runs`` (listed in local order), in order.

    The one place a window of runs is cut, for :func:`cut_runs`, for
    :class:`~dist_memopt.shard.runs.RunsGeometry` and (through it) for the fused kernels: per run
    group a partial first run, whole runs, a partial last run, each still at its global
    position. Each piece comes with ``whole``: whether it consists of whole runs of its group
    (the torch path locates whole runs by stride, partial ones as contiguous ranges).
    """
    if not 0 <= lo <= hi:
        raise ValueError(f"window [{lo}, {hi}) of local elements is not a range")
    base = 0
    for run in runs:
        a, b = max(lo, base) - base, min(hi, base + run.numel) - base
        base += run.numel
        if a < b:
            yield from _window_group(run, a, b)
    if hi > base:
        raise ValueError(f"window [{lo}, {hi}) ends past the {base} local elements of its runs")


def _window_group(run: Run, a: int, b: int) -> Iterator[tuple[Run, bool]]:
    """Elements ``[a, b)`` (non-empty) of one run group, as ``(piece, whole)`` pairs."""
    first, last = a // run.length, (b - 1) // run.length

    def at(i: int) -> int:
        """Global start of the i-th run of the group."""
        return run.start + i * run.stride

    if first == last:
        yield Run(at(first) + a % run.length, b - a), b - a == run.length
        return
    if a % run.length:
        yield Run(at(first) + a % run.length, run.length - a % run.length), False
        first += 1
    whole_end = last + 1 if b % run.length == 0 else last
    if whole_end > first:
        count = whole_end - first
        yield Run(at(first), run.length, run.stride if count > 1 else 0, count), True
    if b % run.length:
        yield Run(at(last), b % run.length), False


def cut_runs(runs: Sequence[Run], lo: int, hi: int) -> list[Run]:
    """The runs of local elements ``[lo, hi)`` of ``runs`` (listed in local order).

    A data-parallel range of a tensor-parallel piece (Megatron's distributed optimizer shards each
    rank's piece by its local flattening): the pieces of :func:`window_runs`.
    """
    return [piece for piece, _ in window_runs(runs, lo, hi)]


@dataclass(frozen=True)
class ShardSpec:
    """The global flat positions of a parameter that this rank holds, and who holds the rest.

    By default the contiguous range ``[start, end)`` of the row-major flattening; with ``runs``
    the positions of those run groups, in order (``start``/``end`` are then their span). ``group``
    is the process group over which the parameter is divided (its statistics are completed by an
    all_reduce over it), or a tuple of groups whose product divides it (a tensor-parallel and a
    data-parallel mesh dimension); ``None`` means this rank holds the whole parameter or the
    other holders are exact replicas (DDP), so no communication is needed.
    """

    global_shape: torch.Size
    start: int
    end: int
    group: Optional[ProcessGroup | GroupChain] = field(default=None, compare=False)
    runs: Optional[tuple[Run, ...]] = None
    #: what every holder of the parameter must agree on beyond its shape (a DTensor's placements
    #: and mesh shape); the step checks it across the group before any state changes
    signature: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", torch.Size(self.global_shape))
        if isinstance(self.group, tuple) and not self.group:
            object.__setattr__(self, "group", None)
        if self.runs is not None:
            object.__setattr__(self, "runs", _normalized_runs(self.runs))
        if not (0 <= self.start <= self.end <= self.global_numel):
            raise ValueError(
                f"shard range [{self.start}, {self.end}) does not fit a parameter of shape "
                f"{tuple(self.global_shape)} ({self.global_numel} elements)"
            )
        if self.runs is not None:
            span = (self.runs[0].start, self.runs[-1].last) if self.runs else (self.start, self.start)
            if (self.start, self.end) != span:
                raise ValueError(f"shard range [{self.start}, {self.end}) is not the span {span} of its runs")
            position = 0
            for run in self.runs:
                if run.start < position:
                    raise ValueError("the runs of a shard must be ordered and must not overlap")
                position = run.last
        for group in self.groups:
            if dist.get_rank(group) < 0:
                raise ValueError(
                    "the process group of a shard does not contain this rank "
                    f"(rank {dist.get_rank()}): optimizer and model disagree on process groups"
                )

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def numel(self) -> int:
        if self.runs is None:
            return self.end - self.start
        return sum(run.numel for run in self.runs)

    @property
    def is_contiguous(self) -> bool:
        """Whether the positions are the one range ``[start, end)``."""
        return self.runs is None

    @property
    def groups(self) -> GroupChain:
        """The process groups whose product divides the parameter (empty: not divided)."""
        return group_chain(self.group)

    @property
    def is_sharded(self) -> bool:
        return self.group is not None

    def take(self, full: Tensor) -> Tensor:
        """This shard's elements of ``full``, the parameter's whole flattened tensor (a view
        for a contiguous range)."""
        if self.runs is None:
            return full[self.start : self.end]
        return torch.cat([_run_positions_view(full, run) for run in self.runs]) if self.runs else full[:0]

    @classmethod
    def full(cls, shape: Sequence[int]) -> "ShardSpec":
        """A whole, unsharded parameter."""
        return cls(torch.Size(shape), 0, math.prod(shape), None)

    @classmethod
    def of_runs(cls, global_shape: Sequence[int], runs: Sequence[Run], group: Any = None, signature: str = "") -> "ShardSpec":
        """The positions of ``runs`` (a contiguous range when they form one)."""
        runs = _normalized_runs(runs)
        if not runs:
            return cls(global_shape, 0, 0, group, signature=signature)
        if len(runs) == 1 and runs[0].count == 1:
            return cls(global_shape, runs[0].start, runs[0].last, group, signature=signature)
        return cls(global_shape, runs[0].start, runs[-1].last, group, runs, signature)


def _normalized_runs(runs: Sequence[Run]) -> tuple[Run, ...]:
    """Runs with adjacent ones merged: a run group whose runs touch is one long run, and
    consecutive single runs one stride apart form a group."""
    merged: list[Run] = []
    for run in runs:
        if run.count > 1 and run.stride == run.length:
            run = Run(run.start, run.numel)
        if merged:
            prev = merged[-1]
            if prev.count == 1 and run.count == 1 and prev.last == run.start:
                merged[-1] = Run(prev.start, prev.length + run.length)
                continue
            if run.count == 1 and run.length == prev.length and (prev.count == 1 or run.start - (prev.last - prev.length) == prev.stride):
                stride = run.start - (prev.last - prev.length) if prev.count == 1 else prev.stride
                if stride >= prev.length:
                    merged[-1] = Run(prev.start, prev.length, stride, prev.count + 1)
                    continue
        merged.append(run)
    return tuple(merged)


def _run_positions_view(full: Tensor, run: Run) -> Tensor:
    """The elements of one run group in a flat tensor, as a (count, length) strided view."""
    return full.as_strided((run.count, run.length), (run.stride * full.stride(0), full.stride(0)),
                           full.storage_offset() + run.start * full.stride(0)).reshape(-1)


@dataclass(frozen=True)
class Segment:
    """A logical parameter's piece, at ``offset`` in its optimizer tensor's flattened local data."""

    offset: int
    spec: ShardSpec
    name: str = ""

    @property
    def numel(self) -> int:
        return self.spec.numel


@dataclass(frozen=True)
class ParamLayout:
    """All segments of one optimizer tensor, ordered by offset, not overlapping.

    ``checkpoint`` names the form the sharding framework's checkpoint code expects optimizer state
    in ("compact", or a style an adapter registered: "dtensor", "fsdp1", "megatron"; see
    :mod:`dist_memopt.optim.checkpoint`).
    """

    segments: tuple[Segment, ...]
    checkpoint: str = "compact"

    def __post_init__(self) -> None:
        position = 0
        for seg in self.segments:
            if seg.offset < position:
                raise ValueError("segments of a layout must be ordered and must not overlap")
            position = seg.offset + seg.numel

    @property
    def groups(self) -> list[ProcessGroup]:
        seen: dict[int, ProcessGroup] = {}
        for seg in self.segments:
            for group in seg.spec.groups:
                seen.setdefault(id(group), group)
        return list(seen.values())


def local_tensor(t: Tensor) -> Tensor:
    """The tensor holding this rank's elements (a DTensor's local shard, else ``t`` itself)."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


def grad_like_param(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` placed like ``param``.

    A DTensor gradient can come with other placements than its parameter's (``RowwiseParallel``
    on an ``nn.Embedding`` leaves a Replicate() gradient for a Shard(0) weight); it is brought onto
    the parameter's placements (a local slice when replicated, a reduce-scatter when Partial).
    """
    placements = getattr(param, "placements", None)
    if placements is None or getattr(grad, "placements", None) is None or tuple(grad.placements) == tuple(placements):
        return grad
    return grad.redistribute(param.device_mesh, placements)


Resolver = Callable[[Tensor], Optional[ParamLayout]]
_RESOLVERS: list[Resolver] = []
# Declared layouts live in a weak, identity-keyed table rather than on the tensors: torch.save
# pickles a tensor's attributes, and a process group cannot be pickled.
_DECLARED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def set_layout(param: Tensor, segments: Sequence[Segment], checkpoint: str = "compact") -> None:
    """Declare where ``param``'s local elements lie (framework adapters and users with their own
    sharding use this); ``checkpoint`` is the state form their checkpoint code expects."""
    declare_layout(param, ParamLayout(tuple(segments), checkpoint=checkpoint))


def declare_layout(param: Tensor, layout: ParamLayout) -> None:
    """:func:`set_layout` for a ready :class:`ParamLayout`."""
    local_numel = local_tensor(param).numel()
    for seg in layout.segments:
        if seg.offset + seg.numel > local_numel:
            raise ValueError(
                f"segment {seg.name or seg.offset} ends at {seg.offset + seg.numel}, past the "
                f"{local_numel} local elements of its tensor"
            )
    _DECLARED[param] = layout


def declared_layout(param: Tensor) -> Optional[ParamLayout]:
    """The layout declared for ``param``, if any."""
    return _DECLARED.get(param)


def register_layout_resolver(resolver: Resolver) -> None:
    """Add a function that recognises a framework's parameters and describes their layout."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def layout_of(param: Tensor) -> ParamLayout:
    """Where ``param``'s local elements lie: declared, recognised by a resolver, or whole."""
    declared = _DECLARED.get(param)
    if declared is not None:
        return declared
    for resolver in _RESOLVERS:
        layout = resolver(param)
        if layout is not None:
            return layout
    return ParamLayout((Segment(0, ShardSpec.full(param.shape)),))
