"""One segment a fused kernel runner steps, as every runner (Triton or C++) receives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["StatSlots", "SMMFJob", "AladaJob", "alada_statistic", "alada_route"]


class StatSlots:
    """Where a segment's kernel writes its statistics: named consecutive pieces of one fp32 span
    (the segment's reducer slot). The Triton runners take views, the C++ ones addresses, which
    cost no tensor per statistic and segment."""

    __slots__ = ("span", "sizes")

    def __init__(self, span: Tensor, sizes: dict[str, int]) -> None:
        self.span = span
        self.sizes = sizes  # statistic name -> length, in the order they lie in the span

    def _offset(self, name: str) -> Optional[int]:
        at = 0
        for key, size in self.sizes.items():
            if key == name:
                return at
            at += size
        return None

    def view(self, name: str) -> Optional[Tensor]:
        """The statistic's piece of the span (None when the segment has no such statistic)."""
        at = self._offset(name)
        return None if at is None else self.span[..., at : at + self.sizes[name]]

    def addresses(self, *names: str) -> list[int]:
        """The address of each statistic's first float (0 where the segment has no such statistic)."""
        base, at, where = self.span.data_ptr(), 0, {}
        for key, size in self.sizes.items():
            where[key] = base + 4 * at
            at += size
        return [where.get(name, 0) for name in names]


def alada_statistic(t: int) -> str:
    """The statistic Alada's step ``t`` (from 0) refits with: ``col`` (Vᵀ·p, for q) at odd t,
    ``row`` (V·q, for p) at even t."""
    return "col" if t % 2 == 1 else "row"


def alada_route(schedules: list[Any]) -> tuple[tuple[bool, bool], ...]:
    """The phase (first step, odd t) of each distinct schedule, in the items' order: what decides,
    besides its segments, which tables an Alada runner builds (which statistic each segment names,
    which segments take one pass, how the refits group), so one table is kept per route."""
    return tuple((hp.t == 0, hp.t % 2 == 1) for hp in {id(hp): hp for hp in schedules}.values())


@dataclass
class SMMFJob:
    """A segment of SMMF's step and the slots its kernel writes the new sums of V (``row_v``,
    ``col_v``) and, with a first moment, of |M| (``row_m``, ``col_m``) to."""

    item: Any  # StepItem
    seg: Any  # SegmentPlan
    hp: Any  # smmf._Schedule
    slots: StatSlots


@dataclass
class AladaJob:
    """A segment of Alada's step and the slots of its statistics (``row``: V·q at even t, ``col``:
    Vᵀ·p at odd t) and of ‖G0‖² (``norm``)."""

    item: Any  # StepItem
    seg: Any  # SegmentPlan
    hp: Any  # alada._Schedule
    slots: StatSlots

    @property
    def stat_name(self) -> str:
        return alada_statistic(self.hp.t)

    @property
    def stat(self) -> Tensor:
        view = self.slots.view(self.stat_name)
        assert view is not None
        return view

    @property
    def norm(self) -> Tensor:
        view = self.slots.view("norm")
        assert view is not None
        return view
