"""Machinery shared by SMMF and Alada: layouts, checks, statistic reduction, state dicts.

A subclass writes its math once, per segment, on local fp32 tensors and a
:class:`~dist_memopt.shard.geometry.RangeGeometry`; this base class finds every parameter's
segments (plain tensor, DTensor shard, FSDP1 flat shard, ZeRO partition), validates gradients
before any state changes, hands out statistic slots that a single all_reduce per process group
completes, and keeps ``state_dict`` / ``load_state_dict`` conventional and safe.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from dist_memopt.optim.bits import packed_numel
from dist_memopt.kernels.launch import KernelObserver
from dist_memopt.kernels.select import TRITON_DEVICES, fused_step, takes_kernel
from dist_memopt.optim.plan import ParamPlan, SegmentPlan, StepItem, decay_weights
from dist_memopt.optim.preflight import GradientCheck, NonFiniteGradientError, StepCounts, check_step, first_nonfinite
from dist_memopt.optim.state_dict import StateDictMixin
from dist_memopt.optim.stacks import SegmentStack, SegmentWork, Side, StepWork, reserve_statistics, stack_segments
from dist_memopt.optim.step_cache import ItemCache, PlanCache, group_settings
from dist_memopt.optim.state_layout import STATE_KINDS, StateKey, expected_state, kinds_of
from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.reduce import StatReducer
from dist_memopt.shard.runs import view_geometry
from dist_memopt.shard.spec import ParamLayout, grad_like_param, layout_of, local_tensor

__all__ = [
    "FactoredOptimizer",
    "STATE_KINDS",
    "SegmentPlan",
    "ParamPlan",
    "StepItem",
    "SegmentStack",
    "SegmentWork",
    "StepWork",
    "decay_weights",
    "NonFiniteGradientError",
    "check_number",
    "check_foreach",
    "check_ignored_keys",
    "IGNORED_FLAGS",
    "chunk_ranges",
    "default_chunk_numel",
    "first_nonfinite",
    "flat_tensor",
]


def default_chunk_numel(device: torch.device) -> int:
    """Elements processed at once per segment (a multiple of 8, so chunks own whole sign bytes).

    On CPU, a chunk's temporaries (in the step's :class:`~dist_memopt.optim.stacks.Scratch`
    buffers) should stay near the cache: 512K elements (2 MiB per fp32 temporary) is the fastest
    size on a GPT-2-small step; larger chunks spill to memory between ops, smaller ones pay the
    per-chunk Python. On accelerators larger chunks only bound the transient memory.
    """
    return 1 << 19 if device.type == "cpu" else 1 << 26


def chunk_ranges(numel: int, chunk: int):
    """``(lo, hi)`` pieces of ``range(numel)``, each ``chunk`` long except the last."""
    for lo in range(0, numel, chunk):
        yield lo, min(numel, lo + chunk)


def flat_tensor(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` flattened in row-major order as one contiguous ``dtype`` tensor: a view when ``t`` is
    already that, else a copy. Never a strided view: the fused kernels walk raw pointers, and a
    non-contiguous tensor (a slice, a transpose, channels-last) can flatten to one with
    ``reshape``. A copied weight is written back by :meth:`StepItem.commit`."""
    if t.is_contiguous():
        if t.dtype != dtype:
            t = t.to(dtype)
        return t if t.dim() == 1 else t.view(-1)
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t).view(-1)


def _flat_pair(grad: Tensor, data: Tensor, native: bool) -> tuple[Tensor, Tensor]:
    """(grad, weight) as the step reads them: contiguous and flat, in the parameter's own dtype
    where the fused kernels load and store it (``native``), else in fp32."""
    if native:
        return flat_tensor(grad, grad.dtype), flat_tensor(data, data.dtype)
    return flat_tensor(grad, torch.float32), flat_tensor(data, torch.float32)


class FactoredOptimizer(StateDictMixin, Optimizer):
    """Base class; subclasses define hyperparameters, the 2-D view and the per-step math."""

    #: hyperparameter keys every param group of this optimizer has (state-dict type check)
    hyperparameters: tuple[str, ...] = ()
    #: elements per piece when stepping a segment; None picks :func:`default_chunk_numel`
    chunk_numel: Optional[int] = None
    #: every per-parameter state key, declared once (see :mod:`.state_layout`); ``state_kinds``
    #: (key -> kind) derives from it
    state_layout: dict[str, StateKey] = {}
    state_kinds: dict[str, str] = {}
    #: largest segment (elements) stacked with others; bigger ones gain nothing
    batch_numel: int = 1 << 16
    #: the ``dist_memopt.kernels`` module family of this optimizer's fused kernels
    kernel_family: str = ""
    #: receives the fused kernels' launches (name, bytes read, bytes written), set by a benchmark
    #: that counts a step (:class:`dist_memopt.bench.counting.StepCost`); None in training
    kernel_observer: Optional[KernelObserver] = None
    #: parameter dtypes besides fp32 that the fused kernels load and store themselves (fp32 math);
    #: others are stepped through fp32 copies
    kernel_dtypes: tuple[torch.dtype, ...] = ()
    #: param-group keys of other optimizers that this one would silently ignore -> what to write
    #: instead; :data:`IGNORED_FLAGS` are refused only when truthy (``fused=False`` is harmless)
    ignored_keys: dict[str, str] = {}
    #: device types on which ``kernel="auto"`` takes the fused Triton kernels, each first use checked
    #: against the torch path (:mod:`dist_memopt.kernels.verify`); a subclass adding ``"cpu"`` gets
    #: the same on CPU tensors through Triton's interpreter (how the tests exercise the check)
    triton_devices: tuple[str, ...] = TRITON_DEVICES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.state_kinds = kinds_of(cls.state_layout)

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self._validate_group(defaults, where="")
        super().__init__(params, defaults)
        self._plans: dict[int, tuple[Any, ParamPlan]] = {}
        self._pending: Optional[tuple[StatReducer, Callable[[], None]]] = None

    # --- subclass interface ----------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        """Raise ValueError naming any invalid hyperparameter (``where`` locates the group)."""
        raise NotImplementedError

    def _matrix_shape(self, group: dict[str, Any], global_shape: torch.Size) -> Optional[tuple[int, int]]:
        """The 2-D view of a parameter of this global shape, or None to keep its state dense."""
        raise NotImplementedError

    def _plan_key(self, group: dict[str, Any]) -> Any:
        """Group settings that change the plan (a changed value rebuilds it)."""
        return None

    def _expected_state(self, group: dict[str, Any], plan: ParamPlan, saved: bool = False) -> dict[str, tuple[int, torch.dtype]]:
        """State keys this parameter must hold, with element counts and dtypes (from
        :attr:`state_layout`; ``saved``: also the keys only its checkpoints hold)."""
        return expected_state(self.state_layout, group, plan, saved)

    def _state_outside(self, group: dict[str, Any], param: Tensor, plan: ParamPlan) -> dict[str, Tensor]:
        """Copies of this parameter's state kept outside ``self.state`` (keys with ``held=False``),
        compact, for :meth:`state_dict`."""
        return {}

    def _restore_outside(self, group: dict[str, Any], param: Tensor, plan: ParamPlan, values: dict[str, Tensor]) -> None:
        """Put loaded values of :meth:`_state_outside`'s keys back where they live."""

    def statistics(self, group: dict[str, Any]) -> dict[str, Side]:
        """The row/column statistics each factored segment of this group sums per step, by name
        (lengths ``"rows"``, ``"cols"`` or a count); a sharded segment's are completed by the reducer."""
        raise NotImplementedError

    def _schedule(self, group: dict[str, Any], t: int) -> Any:
        """The group's hyperparameters at step ``t`` (counting from 1): a hashable value, equal for
        segments that may step together, with ``decay_factor`` (W ← W·factor first, or None)."""
        raise NotImplementedError

    def _update(self, work: StepWork, reducer: StatReducer) -> None:
        """The optimizer's math: step ``work``'s stacks and fused segments (gradients and layouts
        already checked on every rank, state present, step counts advanced, decoupled decay done)."""
        raise NotImplementedError

    def _check_loop(self) -> None:
        """Raise if the training loop broke a contract this optimizer relies on (before any change)."""

    def _stackable(self, work: SegmentWork) -> bool:
        """Whether a segment may share a stack: small (stacking big ones gains nothing and copies
        them), a contiguous range, and the group's ``foreach`` not False."""
        geo = work.seg.geometry
        return work.item.group.get("foreach") is not False and isinstance(geo, RangeGeometry) and geo.numel <= self.batch_numel

    # --- parameter groups ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            check_ignored_keys(type(self).__name__, group, self.ignored_keys, where=f" (param group {index})")
            self._validate_group(group, where=f" (param group {index})")
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters: "
                    f"{self._param_name(group, i, index)} is {p.dtype}; optimize "
                    "torch.view_as_real(param) instead"
                )
            if not p.is_floating_point():
                raise ValueError(
                    f"{type(self).__name__} needs floating-point parameters: "
                    f"{self._param_name(group, i, index)} is {p.dtype}"
                )

    def _param_name(self, group: dict[str, Any], i: int, group_index: Optional[int] = None) -> str:
        names = group.get("param_names")
        if names is not None:
            return f"parameter '{names[i]}'"
        if group_index is None:
            group_index = next(k for k, g in enumerate(self.param_groups) if g is group)
        return f"param_groups[{group_index}]['params'][{i}]"

    def _cached_name(self, group: dict[str, Any], i: int) -> str:
        """:meth:`_param_name`, remembered per (group, index) while the group's ``param_names``
        list and its position in ``param_groups`` stay the same (every step names every item)."""
        cache = self.__dict__.setdefault("_names", {})
        names = group.get("param_names")
        where = None if names is not None else next(k for k, g in enumerate(self.param_groups) if g is group)
        entry = cache.get((id(group), i))
        if entry is not None and entry[0] is group and entry[1] is names and entry[2] == where:
            return entry[3]
        name = self._param_name(group, i, where)
        cache[(id(group), i)] = (group, names, where, name)
        return name

    def _plan(self, group: dict[str, Any], param: Tensor) -> ParamPlan:
        key = self._plan_key(group)
        cached = self._plans.get(id(param))
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = self._build_plan(group, layout_of(param))
        self._plans[id(param)] = (key, plan)
        return plan

    def _named_plan(self, group: dict[str, Any], param: Tensor, i: int) -> ParamPlan:
        """:meth:`_plan`, with layout errors naming the parameter (they are raised alike on every
        rank: they depend on placements and shapes, not on this rank's piece)."""
        try:
            return self._plan(group, param)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {self._param_name(group, i)}: {error}") from error

    def _build_plan(self, group: dict[str, Any], layout: ParamLayout) -> ParamPlan:
        rows = cols = bits = elems = dense = factored = 0
        segments = []
        for seg in layout.segments:
            if seg.spec.global_numel == 0:
                continue
            shape = self._matrix_shape(group, seg.spec.global_shape)
            if shape is None:
                segments.append(SegmentPlan(seg, None, dense_at=dense))
                dense += seg.numel
                continue
            geometry = view_geometry(shape[0], shape[1], seg.spec)
            segments.append(SegmentPlan(seg, geometry, rows, cols, bits, elems, factor_index=factored))
            rows, cols = rows + shape[0], cols + shape[1]
            bits, elems = bits + packed_numel(seg.numel), elems + seg.numel
            factored += 1
        return ParamPlan(tuple(segments), rows, cols, bits, elems, dense, factored)

    # --- step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.synchronize()
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, where=f" (param group {index})")
        self._check_loop()
        items = self._collect()
        if not items:
            return loss
        try:
            check = GradientCheck(items, self.param_groups, self.kernel_observer, self.__dict__.setdefault("_check_kept", {}))
            work = check.during(lambda: self._plan_step(items))  # the bookkeeping overlaps the finite check
            self._preflight(items, work.reducer, check)
            for item in items:
                if not item.stored:
                    self.state[item.param] = item.state
            self._begin(work)
            self._update(work, work.reducer)
        finally:
            self._caches()[0].release_grads()
        return loss

    def _caches(self) -> tuple[ItemCache, PlanCache]:
        """The previous steps' items and plans, taken again where nothing changed (:mod:`.step_cache`)."""
        caches = self.__dict__.get("_step_caches")
        if caches is None:
            caches = self.__dict__["_step_caches"] = (ItemCache(), PlanCache())
        return caches

    def _plan_step(self, items: list[StepItem]) -> StepWork:
        """The step's bookkeeping that changes no state (it runs before the checks): statistic
        slots, schedules at the coming step counts, and the fused kernels' segments, their tables
        built where the state exists (or the previous step's of the same kind, taken again)."""
        counts = self._step_counter().upcoming([item.state for item in items])
        schedules = self._schedules(items, counts)
        kernel_items = [item for item in items if item.kernel]
        fused = fused_step(kernel_items, self.kernel_family, self.kernel_observer)
        by_item = {id(item): hp for item, hp in zip(items, schedules)}
        # only steps whose every segment one kernel family takes are kept, where its runner can take
        # its tables again (the torch path's works are built every step)
        families = {item.kernel for item in items}
        cacheable = fused is not None and len(families) == 1 and None not in families and callable(getattr(type(fused), "reuse", None))
        route, plans = None, self._caches()[1]
        if not cacheable:
            plans.clear()
        else:  # the same item objects as a kept plan's were built from the same settings (ItemCache)
            route = fused.route(schedules)
            saved = plans.take(items, route)
            if saved is not None and fused.reuse(saved.prepared, by_item):
                for work in saved.works:
                    work.schedule = by_item[id(work.item)]
                return StepWork(items, schedules, [], saved.works, fused, reducer=saved.reducer.renew(), counts=counts)
        reducer = StatReducer()
        works = reserve_statistics(items, self.statistics, _needs_slots, reducer)
        reducer.allocate()
        in_kernel = {id(item) for item in kernel_items}
        torch_works, fused_works = [], []
        for work in works:
            work.schedule = by_item[id(work.item)]
            if work.ticket is not None:
                work.span = reducer.slot(work.ticket)
            (fused_works if id(work.item) in in_kernel else torch_works).append(work)
        presence: dict[int, tuple[bool, ...]] = {}
        missing = {id(item): entries for item in items if (entries := self._missing_state(item, presence))}
        if fused is not None:
            for w in fused_works:
                fused.add(w.item, w.seg, w.schedule, w.slots)
            if not any(id(item) in missing for item in kernel_items):
                fused.prepare()
                if cacheable:
                    plans.keep(items, route, fused_works, reducer, fused.prepared())
        return StepWork(items, schedules, [], fused_works, fused, torch_works=torch_works, missing=missing, reducer=reducer,
                        counts=counts)

    def _begin(self, work: StepWork) -> None:
        """The step's common prologue, once the checks passed: step counts, missing state,
        decoupled decay, and the torch path's stacks."""
        self._step_counter().advance([item.state for item in work.items], work.counts)  # to the schedules' counts
        decays: list[tuple[Tensor, float]] = []
        for item, hp in zip(work.items, work.schedules):
            for key, numel, dtype in work.missing.get(id(item), ()):
                self._ensure(item.state, key, numel, dtype, item.weight.device)
            if hp.decay_factor is not None:  # the fused kernels decay their own segments' elements
                targets = [s.local(item.weight) for s in item.plan.dense_segments] if item.kernel else [item.weight]
                decays += [(target, hp.decay_factor) for target in targets]
        decay_weights(decays)  # W ← W·(1 − lr·wd) before any update
        work.stacks = stack_segments(work.torch_works, self._stackable)

    def _missing_state(self, item: StepItem, presence: dict[int, tuple[bool, ...]]) -> list[tuple[str, int, torch.dtype]]:
        """(key, numel, dtype) of the state ``item`` must hold and does not yet; ``presence`` keeps
        which keys each group's settings call for, per step."""
        group_key = id(item.group)
        if group_key not in presence:
            presence[group_key] = tuple(entry.present(item.group) for entry in self.state_layout.values())
        return [entry for entry in self._state_entries(item, presence[group_key]) if item.state.get(entry[0]) is None]

    def _schedules(self, items: list[StepItem], counts: list[int]) -> list[Any]:
        """Each item's schedule at its step count, built once per (group, step count)."""
        built: dict[tuple[int, int], Any] = {}
        schedules = []
        for item, t in zip(items, counts):
            key = (id(item.group), t)
            if key not in built:
                built[key] = self._schedule(item.group, t)
            schedules.append(built[key])
        return schedules

    def _state_entries(self, item: StepItem, presence: tuple[bool, ...]) -> tuple[tuple[str, int, torch.dtype], ...]:
        """(key, numel, dtype) of the state ``item`` must hold, kept per plan while the group's
        settings that decide which keys exist (``presence``) stay the same."""
        cache = self.__dict__.setdefault("_state_entries_cache", {})
        cached = cache.get(id(item.plan))
        if cached is not None and cached[0] is item.plan and cached[1] == presence:
            return cached[2]
        entries = tuple((key, numel, dtype) for key, (numel, dtype) in self._expected_state(item.group, item.plan).items())
        cache[id(item.plan)] = (item.plan, presence, entries)
        return entries

    def _collect(self) -> list[StepItem]:
        items = []
        cache = self._caches()[0]
        classwide = (self.chunk_numel, self.kernel_dtypes, self.triton_devices)
        try:
            for index, group in enumerate(self.param_groups):
                settings = cache.settings(index, (group_settings(group), classwide))
                for i, p in enumerate(group["params"]):
                    item = cache.take(p, group, i, settings, self.state.get(p))
                    if item is None:
                        item = self._collect_one(group, i, p)
                        if item is None:
                            continue
                        cache.keep(item, i, settings)
                    items.append(item)
        except BaseException:
            cache.clear()  # holds no gradient of a step that did not happen
            raise
        cache.commit()
        return items

    def _collect_one(self, group: dict[str, Any], i: int, p: Tensor) -> Optional[StepItem]:
        """The step item of parameter ``i`` of ``group``, or None when it takes no part."""
        data = local_tensor(p)
        plan = self._named_plan(group, p, i)  # on every rank, in the same order
        if p.grad is None:
            # A rank whose shard of a parameter is empty gets no gradient from FSDP1
            # (use_orig_params=True); it must still post that parameter's statistics.
            if data.numel() or not any(s.group is not None for s in plan.segments):
                return None
            grad = data
        else:
            placed = grad_like_param(p, p.grad)
            if placed is not p.grad:
                p.grad = placed  # the optimizer's view of it is the parameter's shard
            grad = local_tensor(placed)
        name = self._cached_name(group, i)
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients ({name}); "
                "use a dense embedding (sparse=False)"
            )
        if grad.shape != data.shape:
            raise RuntimeError(
                f"gradient of {name} has local shape {tuple(grad.shape)} but the "
                f"parameter has {tuple(data.shape)}"
            )
        chunk = self.chunk_numel or default_chunk_numel(data.device)
        if chunk % 8:
            raise ValueError(f"chunk_numel must be a multiple of 8, got {chunk}")
        state = self.state[p] if p in self.state else {}  # stored once the step commits
        kernel = takes_kernel(type(self), group, data, grad, self.triton_devices)
        flat_grad, flat_weight = _flat_pair(grad, data, kernel is not None and self._native(kernel, plan, grad, data))
        return StepItem(group, p, name, plan, state, flat_grad, flat_weight, data, chunk, kernel)

    def _native(self, family: str, plan: ParamPlan, grad: Tensor, data: Tensor) -> bool:
        """Whether the fused kernels of ``family``, when they step this parameter, do so in its own
        dtype: all its segments are theirs (a dense one would step an fp32 copy that commit()
        writes back over theirs); the CPU kernels take a weight and gradient of one dtype."""
        dtypes = self.kernel_dtypes
        if data.dtype not in dtypes or grad.dtype not in dtypes or plan.dense_segments:
            return False
        return family != "cpu" or grad.dtype == data.dtype

    def _preflight(self, items: list[StepItem], reducer: StatReducer, check: GradientCheck) -> None:
        """Raise, on every rank alike and before any state changes, on bad gradients or layouts
        (see :func:`~dist_memopt.optim.preflight.check_step`)."""
        agreed = self.__dict__.setdefault("_agreed", {})
        check_step(type(self).__name__, items, reducer, agreed, check)

    # --- statistic reduction ---------------------------------------------------------------

    def synchronize(self) -> None:
        """Finish a reduction left running by the previous step (state_dict() calls this)."""
        if self._pending is not None:
            reducer, finish = self._pending
            self._pending = None
            reducer.wait()
            finish()

    def pending_bytes(self) -> int:
        """Bytes of statistic buffers kept alive until the next step completes them."""
        return 0 if self._pending is None else self._pending[0].nbytes()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.optim.Optimizer.__setstate__ adds differentiable=False to the defaults for its own
        # step decorator; these optimizers take no such argument, and the backfill below would put
        # it into every param group (and so into state_dict())
        self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_pending", None)
        self.__dict__.pop("_step_caches", None)
        self.__dict__.pop("_step_counts", None)  # the states were replaced: read their steps once
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # --- helpers for subclasses ------------------------------------------------------------

    @staticmethod
    def _ensure(state: dict[str, Any], key: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        value = state.get(key)
        if value is None:
            value = torch.zeros(numel, dtype=dtype, device=device)
            state[key] = value
        return value

    def _step_counter(self) -> StepCounts:
        """The per-parameter step counters (CPU float32 tensors, as in torch.optim), advanced with
        one op and known without reading the tensors back (see :class:`StepCounts`)."""
        return self.__dict__.setdefault("_step_counts", StepCounts())


def _needs_slots(item: StepItem, seg: SegmentPlan) -> bool:
    """Reducer slots for sharded segments, and for the fused kernels (they write sums there)."""
    return seg.group is not None or item.kernel


#: torch.optim flags with no meaning here: refused when set (truthy), accepted when off.
IGNORED_FLAGS = {
    "fused": "there is no fused kernel; remove it (foreach=None already batches small tensors)",
    "capturable": "CUDA-graph capture is not supported; remove it",
    "differentiable": "the step is not differentiable; remove it",
    "amsgrad": "there is no AMSGrad variant; remove it",
    "maximize": "negate the loss instead",
}


def check_ignored_keys(kind: str, group: dict[str, Any], ignored: dict[str, str], where: str = "") -> None:
    """ValueError naming a param-group key another optimizer uses that ``kind`` would ignore.

    Keys torch and its LR schedulers add (``initial_lr``, ``max_lr``, momentum keys) and
    ``param_names`` are not listed, so they keep working.
    """
    for key, hint in ignored.items():
        if key in group:
            raise ValueError(f"{kind} ignores the param-group key {key!r}{where} (= {group[key]!r}): {hint}")
    for key, hint in IGNORED_FLAGS.items():
        if group.get(key):
            raise ValueError(f"{kind} ignores the param-group key {key!r}{where} (= {group[key]!r}): {hint}")


def check_foreach(group: dict[str, Any], where: str = "") -> None:
    """ValueError unless the group's ``foreach`` is None, True or False."""
    foreach = group.get("foreach")
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"Invalid foreach{where}: {group['foreach']!r} (must be None, True or False)")


def check_number(
    name: str,
    value: Any,
    where: str = "",
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    tensor: bool = False,
) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite real number in the allowed range.

    ``tensor``: a one-element floating-point tensor is accepted too, as torch.optim accepts a
    tensor ``lr`` (its value is read at every step, so changing it in place takes effect).
    """
    if isinstance(value, Tensor):
        if not tensor:
            raise ValueError(f"Invalid {name}{where}: {value!r} (must be a Python number, not a tensor)")
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"Invalid {name}{where}: a tensor {name} must hold one floating-point element, got "
                f"shape {tuple(value.shape)} of {value.dtype}"
            )
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}{where}: {value!r} is a {type(value).__name__} (must be a finite number)")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be finite)")
    if low is not None and (value < low or (low_open and value <= low)):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (value > high or (high_open and value >= high)):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be {'<' if high_open else '<='} {high})")
