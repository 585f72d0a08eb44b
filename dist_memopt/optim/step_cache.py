"""The previous step's bookkeeping, taken again where nothing it was built from has changed.

A training loop steps the same parameters with the same settings every time. Each step's items
(which parameter, which segments, which kernel), its statistic slots and the fused CPU kernels'
tables then come out as the step before, except for the gradients (new tensors after each
backward) and the schedules (learning rate, step count). Building them costs Python per
parameter, 27–36 µs, which for a model of many small tensors costs more than the kernels;
checking that they still hold and patching the gradients' addresses costs a few µs.

Everything is built afresh as soon as anything it was derived from may differ: another parameter
object, local tensor or storage, gradient dtype, shape, placement or layout, param-group setting
other than ``lr``, state dict or state tensor, or class setting. Neither cache holds a gradient
between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import is_
from typing import Any, Optional

from torch import Tensor

from dist_memopt.optim.plan import StepItem
from dist_memopt.shard.spec import grad_like_param, local_tensor

__all__ = ["ItemCache", "PlanCache", "group_settings"]


def group_settings(group: dict[str, Any]) -> tuple:
    """A param group's settings besides ``params`` and ``lr`` (read afresh every step), comparable
    with ``==``: tensors by identity."""
    return tuple((k, id(v) if isinstance(v, Tensor) else v) for k, v in group.items() if k not in ("params", "lr"))


def _equal(a: tuple, b: tuple) -> bool:
    """``a == b``, False where a value cannot say (an array's ``==`` has no single truth value)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - any failure to compare means "not known to be equal"
        return False


@dataclass
class _Entry:
    item: StepItem
    index: int  # the parameter's position in its group (its name depends on it)
    settings: tuple  # what ItemCache.settings returned for its group: compared by identity
    dtensor: bool  # the parameter is a DTensor (its local tensor is its shard)
    data: Tensor  # the local tensor the item's flat weight views
    address: int  # and its storage address
    grad_kind: tuple  # (type, dtype, device, shape) of the local gradient the item was built for
    numel: int  # and its elements


class ItemCache:
    """Per parameter, the previous step's :class:`StepItem`, taken again with the new gradient.

    Only items that step the parameter's own storage (no fp32 copy of the weight or gradient) are
    kept; an item is taken again only when every input of its construction is the same.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._next: dict[int, _Entry] = {}
        self._settings: dict[int, tuple] = {}  # group position -> its last settings

    def settings(self, index: int, value: tuple) -> tuple:
        """``value``, the settings of the group at ``index`` this step, as the very object the
        previous step returned where they are equal: items compare it by identity."""
        previous = self._settings.get(index)
        if previous is not None and _equal(previous, value):
            return previous
        self._settings[index] = value
        return value

    def take(self, param: Tensor, group: dict[str, Any], index: int, settings: tuple, state: Optional[dict]) -> Optional[StepItem]:
        """The item kept for ``param`` with its gradient replaced by ``param.grad``'s, or None."""
        entry = self._entries.get(id(param))
        if entry is None:
            return None
        item = entry.item
        if item.param is not param or item.group is not group or entry.index != index or item.state is not state or entry.settings is not settings:
            return None
        grad = param.grad
        if grad is None:
            return None
        if entry.dtensor:
            if grad_like_param(param, grad) is not grad:
                return None  # placed anew each step: the full path does that
            data, local = local_tensor(param), local_tensor(grad)
            if (type(local), local.dtype, local.device, local.shape) != entry.grad_kind:
                return None
        else:  # torch refuses a .grad of another dtype, device or size than the parameter's
            data, local = param, grad
            if local.dtype is not entry.grad_kind[1] or local.numel() != entry.numel:
                return None
        if data is not entry.data or data.data_ptr() != entry.address or local.is_sparse or not local.is_contiguous():
            return None
        item.grad = local if local.dim() == 1 else local.view(-1)
        item.stored = True  # ``state`` is what optimizer.state holds for ``param``
        self._next[id(param)] = entry
        return item

    def keep(self, item: StepItem, index: int, settings: tuple) -> None:
        """Remember a freshly built item for the next step (where it steps the parameter's storage)."""
        data = item._data
        grad = local_tensor(item.param.grad) if item.param.grad is not None else None
        # the item's flat weight and gradient are the parameter's and gradient's own storage (no copy)
        if grad is None or item.weight.data_ptr() != data.data_ptr() or item.grad.data_ptr() != grad.data_ptr():
            return
        dtensor = local_tensor(item.param) is not item.param
        kind = (type(grad), grad.dtype, grad.device, grad.shape)
        self._next[id(item.param)] = _Entry(item, index, settings, dtensor, data, data.data_ptr(), kind, grad.numel())

    def commit(self) -> None:
        """End of a collection: what was taken or kept is what the next step may take."""
        self._entries, self._next = self._next, {}

    def release_grads(self) -> None:
        """Drop the kept items' gradients (the cache must not keep a backward's output alive)."""
        for entry in self._entries.values():
            entry.item.grad = None  # type: ignore[assignment]  # set again by take()

    def clear(self) -> None:
        self._entries, self._next, self._settings = {}, {}, {}


@dataclass
class _SavedPlan:
    items: list[StepItem]
    states: list[tuple]  # per item, its state's tensors (by identity)
    works: list  # SegmentWork, all fused
    reducer: Any  # StatReducer: its layout and buffers serve the next step
    prepared: Any  # the runner's tables


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))


class PlanCache:
    """The works, statistic slots and fused CPU kernel tables of the last step of each route (the
    runner's key of which kernels its segments take: Alada's alternate between odd and even steps)."""

    def __init__(self) -> None:
        self._saved: dict[Any, _SavedPlan] = {}

    def take(self, items: list[StepItem], route: Any) -> Optional[_SavedPlan]:
        """The plan kept for these very items (the :class:`ItemCache`'s: built from unchanged
        settings) and ``route``, if their state tensors are still the ones its tables address."""
        saved = self._saved.get(route)
        if saved is None:
            return None
        if not _same(items, saved.items):
            self._saved = {}  # other parameters now: no kept plan serves (nor keeps them alive)
            return None
        for item, tensors in zip(items, saved.states):
            if len(item.state) != len(tensors) or not all(map(is_, item.state.values(), tensors)):
                return None
        return saved

    def keep(self, items: list[StepItem], route: Any, works: list, reducer: Any, prepared: Any) -> None:
        states = [tuple(item.state.values()) for item in items]
        if any(not _same(saved.items, items) for saved in self._saved.values()):
            self._saved = {}  # other parameters: the other routes' plans are stale
        self._saved[route] = _SavedPlan(list(items), states, works, reducer, prepared)

    def clear(self) -> None:
        self._saved = {}
