"""A parameter's plan for a step: its segments' 2-D views and where their state lives.

:class:`SegmentPlan` slices one segment's part out of a parameter's concatenated state;
:class:`StepItem` is a parameter taking part in a step (see :mod:`.stacks` for how segments are
grouped into batches).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dist_memopt.optim.bits import packed_numel
from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.runs import RunsGeometry
from dist_memopt.shard.spec import Segment

__all__ = ["SegmentPlan", "ParamPlan", "StepItem", "decay_weights"]


@dataclass(frozen=True)
class SegmentPlan:
    """One segment's 2-D view and where its pieces live in the parameter's concatenated state.

    ``geometry`` is None for segments kept dense (SMMF with ``vector_reshape=False``).
    ``rows_at``/``cols_at`` index the concatenated row/column factors, ``bits_at`` the packed
    sign bytes, ``elems_at`` the concatenated per-element state of factored segments and
    ``dense_at`` that of dense segments; ``factor_index`` counts factored segments before it.
    """

    segment: Segment
    geometry: Optional[RangeGeometry | RunsGeometry]
    rows_at: int = 0
    cols_at: int = 0
    bits_at: int = 0
    elems_at: int = 0
    dense_at: int = 0
    factor_index: int = 0

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return self.segment.spec.group

    def rows(self, t: Tensor) -> Tensor:
        assert self.geometry is not None
        return t[self.rows_at : self.rows_at + self.geometry.rows]

    def cols(self, t: Tensor) -> Tensor:
        assert self.geometry is not None
        return t[self.cols_at : self.cols_at + self.geometry.cols]

    def bits(self, t: Tensor) -> Tensor:
        return t[self.bits_at : self.bits_at + packed_numel(self.segment.numel)]

    def elems(self, t: Tensor) -> Tensor:
        return t[self.elems_at : self.elems_at + self.segment.numel]

    def dense(self, t: Tensor) -> Tensor:
        return t[self.dense_at : self.dense_at + self.segment.numel]

    def local(self, flat: Tensor) -> Tensor:
        """This segment's elements in the parameter's flattened local data (or gradient)."""
        return flat[self.segment.offset : self.segment.offset + self.segment.numel]


@dataclass(frozen=True)
class ParamPlan:
    segments: tuple[SegmentPlan, ...]
    rows: int
    cols: int
    bits: int
    elems: int
    dense: int
    factored_count: int

    # computed once per plan: every step reads them for every parameter
    @cached_property
    def factored(self) -> tuple[SegmentPlan, ...]:
        return tuple(s for s in self.segments if s.geometry is not None)

    @cached_property
    def dense_segments(self) -> tuple[SegmentPlan, ...]:
        return tuple(s for s in self.segments if s.geometry is None)


@dataclass(eq=False)
class StepItem:
    """A parameter taking part in this step, with flat views of its local data and grad: fp32
    (views, or copies of other dtypes), or the parameter's own dtype where the fused kernels take
    it (:attr:`~dist_memopt.optim.base.FactoredOptimizer.kernel_dtypes`)."""

    group: dict
    param: Tensor
    name: str
    plan: ParamPlan
    state: dict
    grad: Tensor  # flat, local; fp32 unless the kernels take the parameter's dtype
    weight: Tensor  # flat, local, same dtype rule; written back to the parameter by commit()
    _data: Tensor
    chunk: int  # elements per piece when a segment is processed piecewise
    kernel: Optional[str] = None  # the fused kernel family that steps it ("triton", "cpu"; decided in _collect)
    #: its state dict is the one ``optimizer.state`` holds (an item taken again from the previous step)
    stored: bool = False

    def __post_init__(self) -> None:
        self._copied = self.weight.data_ptr() != self._data.data_ptr()  # a copy of another dtype or layout

    def commit(self) -> None:
        if self._copied:
            self._data.copy_(self.weight.view_as(self._data))


def decay_weights(decays: Iterable[tuple[Tensor, float]]) -> None:
    """Decoupled weight decay, W ← W·factor, with one foreach op per (factor, device)."""
    grouped: dict[tuple[float, torch.device], list[Tensor]] = defaultdict(list)
    for weight, factor in decays:
        grouped[(factor, weight.device)].append(weight)
    for (factor, _), weights in grouped.items():
        torch._foreach_mul_(weights, factor)
