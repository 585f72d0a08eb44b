"""Shard descriptions: where each logical parameter's elements lie on this rank.

An optimizer tensor (what sits in ``param_groups``) holds, in its local data, one or more
*segments*: contiguous pieces of logical parameters (an FSDP1 FlatParameter or a ZeRO partition
holds many; a DTensor shard or a plain tensor holds one). A segment says which flat range of which
global shape it is, and over which process group the parameter is divided. That is all the
optimizer math needs; framework adapters only produce these descriptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ShardSpec",
    "Segment",
    "ParamLayout",
    "local_tensor",
    "set_layout",
    "layout_of",
    "register_layout_resolver",
]

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class ShardSpec:
    """This rank's contiguous range ``[start, end)`` of a parameter's row-major flattening.

    ``group`` is the process group over which the parameter is divided (its statistics are
    completed by an all_reduce over it); ``None`` means this rank holds the whole parameter or
    the other holders are exact replicas (DDP), so no communication is needed.
    """

    global_shape: torch.Size
    start: int
    end: int
    group: Optional[ProcessGroup] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", torch.Size(self.global_shape))
        if not (0 <= self.start <= self.end <= self.global_numel):
            raise ValueError(
                f"shard range [{self.start}, {self.end}) does not fit a parameter of shape "
                f"{tuple(self.global_shape)} ({self.global_numel} elements)"
            )
        if self.group is not None and dist.get_rank(self.group) < 0:
            raise ValueError(
                "the process group of a shard does not contain this rank "
                f"(rank {dist.get_rank()}): optimizer and model disagree on process groups"
            )

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def is_sharded(self) -> bool:
        return self.group is not None

    @classmethod
    def full(cls, shape: Sequence[int]) -> "ShardSpec":
        """A whole, unsharded parameter."""
        return cls(torch.Size(shape), 0, math.prod(shape), None)


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
    in ("compact", "dtensor", "fsdp1"; see :mod:`dist_memopt.checkpoint`).
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
            if seg.spec.group is not None:
                seen.setdefault(id(seg.spec.group), seg.spec.group)
        return list(seen.values())


def local_tensor(t: Tensor) -> Tensor:
    """The tensor holding this rank's elements (a DTensor's local shard, else ``t`` itself)."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


_LAYOUT_ATTR = "_dist_memopt_layout"
Resolver = Callable[[Tensor], Optional[ParamLayout]]
_RESOLVERS: list[Resolver] = []


def set_layout(param: Tensor, segments: Sequence[Segment], checkpoint: str = "compact") -> None:
    """Declare by hand where ``param``'s local elements lie (framework adapters use this).

    ``checkpoint`` names the form ``state_dict()`` gives its state in (see
    :mod:`dist_memopt.checkpoint`).
    """
    layout = ParamLayout(tuple(segments), checkpoint)
    local_numel = local_tensor(param).numel()
    for seg in layout.segments:
        if seg.offset + seg.numel > local_numel:
            raise ValueError(
                f"segment {seg.name or seg.offset} ends at {seg.offset + seg.numel}, past the "
                f"{local_numel} local elements of its tensor"
            )
    setattr(param, _LAYOUT_ATTR, layout)


def register_layout_resolver(resolver: Resolver) -> None:
    """Add a function that recognises a framework's parameters and describes their layout."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def layout_of(param: Tensor) -> ParamLayout:
    """Where ``param``'s local elements lie: declared, recognised by a resolver, or whole."""
    declared = getattr(param, _LAYOUT_ATTR, None)
    if declared is not None:
        return declared
    _load_builtin_resolvers()
    for resolver in _RESOLVERS:
        layout = resolver(param)
        if layout is not None:
            return layout
    return ParamLayout((Segment(0, ShardSpec.full(param.shape)),))


def _load_builtin_resolvers() -> None:
    """Import the adapters that recognise parameters by type (FSDP2 DTensors, FSDP1)."""
    if not _RESOLVERS_LOADED:
        _RESOLVERS_LOADED.append(True)
        from dist_memopt.integrations import fsdp  # noqa: F401  (registers its resolvers)


_RESOLVERS_LOADED: list[bool] = []
