"""One segment a fused kernel runner steps, as every runner (Triton or C++) receives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["SMMFJob", "AladaJob"]


@dataclass
class SMMFJob:
    """A segment of SMMF's step and the reducer slots its kernel writes the new sums to."""

    item: Any  # StepItem
    seg: Any  # SegmentPlan
    hp: Any  # smmf._Schedule
    slots: tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]  # row/col sums of V, of |M|


@dataclass
class AladaJob:
    """A segment of Alada's step and the slots of this step's statistic and of ‖G0‖²."""

    item: Any  # StepItem
    seg: Any  # SegmentPlan
    hp: Any  # alada._Schedule
    stat: Tensor  # the row (even t) or column (odd t) statistic slot
    norm: Tensor  # the ‖G0‖² slot
