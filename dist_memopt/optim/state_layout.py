"""Each optimizer's state, declared once: what every key holds, in which dtype, and when.

An optimizer lists its keys as :class:`StateKey` entries (the way optax declares a state
``NamedTuple``); everything else derives from that table through the functions here — the zero
state and the loaded-state check (:func:`expected_state`), per-segment views
(:meth:`~dist_memopt.optim.state_dict.StateDictMixin.segment_states`), checkpoint expansion and
compaction (:mod:`dist_memopt.optim.checkpoint`), DeepSpeed's and Megatron's state forms — so a
new key is one line in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["StateKey", "STATE_KINDS", "PER_ELEMENT_KINDS", "VALUE_KINDS", "expected_state", "kinds_of", "outside_keys", "per_element_keys"]

#: The layouts a state key can have, named after the :class:`~dist_memopt.optim.plan.SegmentPlan`
#: accessor that slices one segment's part out of the concatenated tensor. Per element of the
#: segment's range: ``elems`` (factored segments), ``dense`` (segments kept dense), ``bits`` (packed
#: sign bits of factored segments, 8 per byte, each segment starting on a fresh byte). Per
#: parameter, whole: ``rows`` and ``cols`` (the 2-D view's factors), ``factor`` (one value per
#: factored segment).
STATE_KINDS = ("elems", "dense", "bits", "rows", "cols", "factor")
#: kinds with one entry per element of the shard (the rest are global-size, equal on every holder)
PER_ELEMENT_KINDS = ("bits", "elems", "dense")
#: per-element kinds that hold values (not packed signs): what a per-element state API can hand out
VALUE_KINDS = ("elems", "dense")


def _always(group: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class StateKey:
    """One state key: its kind (see :data:`STATE_KINDS`), dtype, and the groups that have it.

    A key of a factored kind exists for parameters with factored segments, ``dense`` for those
    with dense ones (``everywhere`` drops that condition); ``present(group)`` adds the group's.
    ``held=False`` marks state kept outside the optimizer (Alada's in-gradient momentum, in
    ``.grad``): only checkpoints hold it, ``state_dict()`` copying it in and
    ``load_state_dict()`` putting it back.
    """

    kind: str
    dtype: torch.dtype = torch.float32
    present: Callable[[Mapping[str, Any]], bool] = _always
    everywhere: bool = False
    held: bool = True

    def __post_init__(self) -> None:
        if self.kind not in STATE_KINDS:
            raise ValueError(f"unknown state kind {self.kind!r} (one of {STATE_KINDS})")


def _numel(kind: str, plan: Any) -> int:
    return {"rows": plan.rows, "cols": plan.cols, "bits": plan.bits, "elems": plan.elems,
            "dense": plan.dense, "factor": plan.factored_count}[kind]


def expected_state(
    table: Mapping[str, StateKey], group: Mapping[str, Any], plan: Any, saved: bool = False
) -> dict[str, tuple[int, torch.dtype]]:
    """The keys a parameter of ``plan`` holds in ``group``, with element counts and dtypes
    (``saved``: also those only its checkpoints hold)."""
    expected = {}
    for key, entry in table.items():
        has_segments = plan.dense > 0 if entry.kind == "dense" else plan.factored_count > 0
        if (has_segments or entry.everywhere) and entry.present(group) and (entry.held or saved):
            expected[key] = (_numel(entry.kind, plan), entry.dtype)
    return expected


def kinds_of(table: Mapping[str, StateKey]) -> dict[str, str]:
    """Key -> kind."""
    return {key: entry.kind for key, entry in table.items()}


def outside_keys(table: Mapping[str, StateKey]) -> list[str]:
    """The keys whose values live outside the optimizer's state (``held=False``)."""
    return [key for key, entry in table.items() if not entry.held]


def per_element_keys(state_kinds: Mapping[str, str]) -> dict[str, str]:
    """The keys holding one entry per element (signs, moments), with their kinds."""
    return {key: kind for key, kind in state_kinds.items() if kind in PER_ELEMENT_KINDS}
