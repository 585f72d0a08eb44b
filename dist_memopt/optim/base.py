"""Machinery shared by SMMF and Alada: layouts, checks, statistic reduction, state dicts.

A subclass writes its math once, per segment, on local fp32 tensors and a
:class:`~dist_memopt.shard.geometry.RangeGeometry`; this base class finds every parameter's
segments (plain tensor, DTensor shard, FSDP1 flat shard, ZeRO partition), validates gradients
before any state changes, hands out statistic slots that a single all_reduce per process group
completes, and keeps ``state_dict`` / ``load_state_dict`` conventional and safe.
"""

from __future__ import annotations

import math
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.reduce import StatReducer
from dist_memopt.shard.spec import ParamLayout, Segment, layout_of, local_tensor
from dist_memopt.checkpoint import compact_state, expand_state
from dist_memopt.optim.bits import packed_numel
from dist_memopt.optim.preflight import StepCounts, agree, first_nonfinite, nonfinite_candidate

__all__ = [
    "FactoredOptimizer",
    "STATE_KINDS",
    "SegmentPlan",
    "ParamPlan",
    "StepItem",
    "SegmentBatches",
    "decay_weights",
    "NonFiniteGradientError",
    "check_number",
    "check_foreach",
    "chunk_ranges",
    "default_chunk_numel",
    "first_nonfinite",
]


def default_chunk_numel(device: torch.device) -> int:
    """Elements processed at once per segment (a multiple of 8, so chunks own whole sign bytes).

    On CPU, large temporaries cost a page fault per 4 KiB each step and fall out of cache; 1M-element
    chunks (4 MiB temporaries) stay in cache and in the allocator's heap, which makes SMMF's many
    elementwise passes cheap. On accelerators the caching allocator removes that cost, and larger
    chunks only bound the transient memory.
    """
    return 1 << 20 if device.type == "cpu" else 1 << 26


def chunk_ranges(numel: int, chunk: int):
    """``(lo, hi)`` pieces of ``range(numel)``, each ``chunk`` long except the last."""
    for lo in range(0, numel, chunk):
        yield lo, min(numel, lo + chunk)


class NonFiniteGradientError(RuntimeError):
    """A gradient holds inf or NaN; raised before any optimizer state or parameter changes."""


@dataclass(frozen=True)
class SegmentPlan:
    """One segment's 2-D view and where its pieces live in the parameter's concatenated state.

    ``geometry`` is None for segments kept dense (SMMF with ``vector_reshape=False``).
    ``rows_at``/``cols_at`` index the concatenated row/column factors, ``bits_at`` the packed
    sign bytes, ``elems_at`` the concatenated per-element state of factored segments and
    ``dense_at`` that of dense segments; ``factor_index`` counts factored segments before it.
    """

    segment: Segment
    geometry: Optional[RangeGeometry]
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

    @property
    def factored(self) -> list[SegmentPlan]:
        return [s for s in self.segments if s.geometry is not None]

    @property
    def dense_segments(self) -> list[SegmentPlan]:
        return [s for s in self.segments if s.geometry is None]


@dataclass(eq=False)
class StepItem:
    """A parameter taking part in this step, with fp32 flat views of its local data and grad."""

    group: dict
    param: Tensor
    name: str
    plan: ParamPlan
    state: dict
    grad: Tensor  # fp32, flat, local
    weight: Tensor  # fp32, flat, local; written back to the parameter by commit()
    _data: Tensor
    chunk: int  # elements per piece when a segment is processed piecewise

    def commit(self) -> None:
        if self.weight.data_ptr() != self._data.data_ptr():
            self._data.copy_(self.weight.view_as(self._data))


class SegmentBatches:
    """Fast-path segments grouped by 2-D view, device and schedule, for batched steps.

    :meth:`run` hands each group to the step function in pieces whose stacked (B, n, m)
    temporaries stay within the chunk size, as a per-tensor step's do.
    """

    def __init__(self) -> None:
        self._batches: dict[tuple, list[tuple[StepItem, SegmentPlan]]] = defaultdict(list)

    def add(self, item: StepItem, seg: SegmentPlan, schedule: Any) -> None:
        geo = seg.geometry
        assert geo is not None
        self._batches[(geo.rows, geo.cols, item.weight.device, schedule)].append((item, seg))

    def run(self, step: Callable[[list[tuple[StepItem, SegmentPlan]], Any], None]) -> None:
        for (rows, cols, _, schedule), batch in self._batches.items():
            per_call = max(1, batch[0][0].chunk // (rows * cols))
            for lo in range(0, len(batch), per_call):
                step(batch[lo : lo + per_call], schedule)


def decay_weights(decays: Iterable[tuple[Tensor, float]]) -> None:
    """Decoupled weight decay, W ← W·factor, with one foreach op per (factor, device)."""
    grouped: dict[tuple[float, torch.device], list[Tensor]] = defaultdict(list)
    for weight, factor in decays:
        grouped[(factor, weight.device)].append(weight)
    for (factor, _), weights in grouped.items():
        torch._foreach_mul_(weights, factor)


def _flat_fp32(t: Tensor) -> Tensor:
    """A flat fp32 view of ``t`` when possible, else a flat fp32 copy."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.view(-1)
    return t.reshape(-1).to(torch.float32)


class FactoredOptimizer(Optimizer):
    """Base class; subclasses define hyperparameters, the 2-D view and the per-step math."""

    #: hyperparameter keys every param group of this optimizer has (state-dict type check)
    hyperparameters: tuple[str, ...] = ()
    #: elements per piece when stepping a segment; None picks :func:`default_chunk_numel`
    chunk_numel: Optional[int] = None
    #: how each per-parameter state key is laid out (see :data:`STATE_KINDS`)
    state_kinds: dict[str, str] = {}
    #: largest segment (elements) the fast path stacks with others; bigger ones gain nothing
    batch_numel: int = 1 << 16

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

    def _expected_state(self, group: dict[str, Any], plan: ParamPlan) -> dict[str, tuple[int, torch.dtype]]:
        """State keys this parameter must hold, with element counts and dtypes."""
        raise NotImplementedError

    def _reserve(self, items: list[StepItem], reducer: StatReducer) -> Any:
        """Reserve statistic slots for this step; must not change any state."""
        raise NotImplementedError

    def _apply(self, items: list[StepItem], reducer: StatReducer, reserved: Any) -> None:
        """Update state and weights (gradients and layouts already checked on every rank)."""
        raise NotImplementedError

    def _batched(self, group: dict[str, Any], seg: SegmentPlan) -> bool:
        """Whether ``seg`` takes the fast path: small, whole and unsharded (no statistics to reduce)."""
        geo = seg.geometry
        assert geo is not None
        return group.get("foreach") is not False and seg.group is None and geo.is_full and geo.numel <= self.batch_numel

    # --- parameter groups ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        self._validate_group(group, where=f" (param group {index})")
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

    def _plan(self, group: dict[str, Any], param: Tensor) -> ParamPlan:
        key = self._plan_key(group)
        cached = self._plans.get(id(param))
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = self._build_plan(group, layout_of(param))
        self._plans[id(param)] = (key, plan)
        return plan

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
            geometry = RangeGeometry(shape[0], shape[1], seg.spec.start, seg.spec.end)
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
        items = self._collect()
        if not items:
            return loss
        reducer = StatReducer()
        reserved = self._reserve(items, reducer)
        reducer.allocate()
        self._preflight(items, reducer)
        for item in items:
            self.state[item.param] = item.state
        self._apply(items, reducer, reserved)
        return loss

    def _collect(self) -> list[StepItem]:
        items = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                data = local_tensor(p)
                if p.grad is None:
                    # A rank whose shard of a parameter is empty gets no gradient from FSDP1
                    # (use_orig_params=True); it must still post that parameter's statistics.
                    if data.numel() or not any(s.group is not None for s in self._plan(group, p).segments):
                        continue
                    grad = data
                else:
                    grad = local_tensor(p.grad)
                name = self._param_name(group, i)
                if grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients ({name}); "
                        "use a dense embedding (sparse=False)"
                    )
                plan = self._plan(group, p)
                if grad.shape != data.shape:
                    raise RuntimeError(
                        f"gradient of {name} has local shape {tuple(grad.shape)} but the "
                        f"parameter has {tuple(data.shape)}"
                    )
                chunk = self.chunk_numel or default_chunk_numel(data.device)
                if chunk % 8:
                    raise ValueError(f"chunk_numel must be a multiple of 8, got {chunk}")
                state = self.state[p] if p in self.state else {}  # stored once the step commits
                items.append(StepItem(group, p, name, plan, state, _flat_fp32(grad), _flat_fp32(data), data, chunk))
        return items

    def _preflight(self, items: list[StepItem], reducer: StatReducer) -> None:
        """Raise, on every rank alike and before any state changes, on bad gradients or layouts.

        Locally: whether a gradient's norm is not finite, kept on the device. Then one small
        all_reduce per process group carries that verdict and a fingerprint of the statistic
        layout: a rank stepping other parameters would post collectives of other sizes and hang, so
        a mismatch becomes an error instead. One host sync reads the verdict (none without
        ``check_finite``, once the ranks agreed on this layout: see :mod:`.preflight`); only a
        non-finite norm costs a second, exact round.
        """
        checked = [i for i, it in enumerate(items) if it.group.get("check_finite", True) and it.grad.numel() > 0]
        verdict = any(g.get("check_finite", True) for g in self.param_groups)  # the same on every rank
        candidate = (
            nonfinite_candidate([items[i].grad for i in checked], checked, items[0].grad.device) if verdict else _NO_VERDICT
        )
        fingerprints = reducer.fingerprints()
        agreed = self.__dict__.setdefault("_agreed", {})
        suspects = []
        groups = _distinct_groups(it.plan for it in items)
        for group in groups:
            fingerprint = fingerprints.get(id(group), 0)
            if not verdict and agreed.get(id(group)) == fingerprint:
                continue
            smallest, same = agree(candidate, fingerprint, group, _group_device(group))
            if not same:
                raise RuntimeError(
                    f"{type(self).__name__}: the ranks of a process group (this is rank "
                    f"{dist.get_rank()}) step different parameters or shapes; build the optimizer "
                    "from the same model, wrapped the same way, on every rank"
                )
            agreed[id(group)] = fingerprint
            if smallest != math.inf:
                suspects.append((group, fingerprint))
        if not groups and verdict and candidate.item() != math.inf:
            suspects.append((None, 0))
        if not suspects:
            return
        bad = self._first_nonfinite(items)  # exact, on suspicion only
        for group, fingerprint in suspects:
            if group is not None:
                bad = min(bad, agree(torch.tensor(bad), fingerprint, group, _group_device(group))[0])
        if bad != math.inf:
            item = items[int(bad)]
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or NaN) for {item.name} of shape "
                f"{tuple(item.param.shape)}; no parameter or optimizer state was changed. "
                "Skip the step, lower the learning rate or use loss scaling; pass "
                "check_finite=False to skip this check."
            )

    @staticmethod
    def _first_nonfinite(items: list[StepItem]) -> float:
        """Index (as a float, inf if none) of the first checked item with an inf/NaN gradient."""
        checked = [i for i, it in enumerate(items) if it.group.get("check_finite", True) and it.grad.numel() > 0]
        first = first_nonfinite([items[i].grad for i in checked])
        return math.inf if first is None else float(checked[first])

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

    # --- state dict ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()``, with the state of sharded parameters in the form
        their framework's checkpoint code expects (see :mod:`dist_memopt.checkpoint`)."""
        self.synchronize()
        sd = super().state_dict()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if index in sd["state"]:
                    plan = self._plan(group, param)
                    style = layout_of(param).checkpoint
                    sd["state"][index] = expand_state(plan, param, sd["state"][index], self.state_kinds, style)
                index += 1
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like :meth:`torch.optim.Optimizer.load_state_dict`, keeping fp32 state fp32.

        Checks that the state fits this optimizer type and these parameters' layouts; on any
        mismatch raises ``ValueError`` and leaves the current state and groups untouched.
        """
        self.synchronize()
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        kind = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{kind}.load_state_dict expects a dict with 'state' and 'param_groups'")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, {kind} has {len(groups)}"
            )
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {index} of the loaded state dict has {len(saved['params'])} "
                    f"parameters, this {kind} has {len(group['params'])}"
                )
            missing = [k for k in self.hyperparameters if k not in saved]
            if missing:
                raise ValueError(
                    f"param group {index} of the loaded state dict lacks {missing}: it was not "
                    f"saved by {kind}"
                )
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        owners = {saved_id: (group, i, index) for index, group in enumerate(new_groups) for i, saved_id in enumerate(
            saved_ids[sum(len(g["params"]) for g in new_groups[:index]) :][: len(group["params"])])}
        unknown = [key for key in state_dict["state"] if key not in owners]
        if unknown:
            raise ValueError(f"loaded state dict has state for unknown parameter ids {unknown}")
        for index, group in enumerate(new_groups):
            self._validate_group(group, where=f" (param group {index} of the loaded state dict)")
        new_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            group, i, index = owners[key]
            param = group["params"][i]
            value = self._compact_loaded(group, param, value)
            self._check_loaded_state(group, param, value, self._param_name(group, i, index))
            new_state[param] = {
                k: (v.to(device=local_tensor(param).device) if isinstance(v, Tensor) else deepcopy(v))
                for k, v in value.items()
            }
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _compact_loaded(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """Loaded state in any checkpoint form -> the compact form held in ``self.state``."""
        layout = layout_of(param)
        single = layout.segments[0].spec if len(layout.segments) == 1 else None
        full_range = (single.start, single.end) if single is not None else None
        return compact_state(self._build_plan(group, layout), param, state, self.state_kinds, full_range)

    def _check_loaded_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any], name: str) -> None:
        kind = type(self).__name__
        if not state:
            return  # a parameter that has not been stepped yet
        plan = self._build_plan(group, layout_of(param))
        expected = dict(self._expected_state(group, plan), step=(1, torch.float32))
        if set(state) != set(expected):
            raise ValueError(
                f"loaded state of {name} has keys {sorted(state)}, {kind} expects {sorted(expected)} "
                f"for it: the state dict was saved by another optimizer or for another shape"
            )
        for key, (numel, dtype) in expected.items():
            value = state[key]
            if not isinstance(value, Tensor):
                raise ValueError(f"loaded state '{key}' of {name} is a {type(value).__name__}, not a tensor")
            if local_tensor(value).numel() != numel or value.dtype != dtype:
                raise ValueError(
                    f"loaded state '{key}' of {name} has {local_tensor(value).numel()} elements of "
                    f"{value.dtype}, {kind} expects {numel} of {dtype}: saved for another shape, "
                    "sharding or optimizer"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_pending", None)
        self.__dict__.pop("_step_counts", None)  # the states were replaced: read their steps once
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # --- state per segment -----------------------------------------------------------------

    def segment_states(
        self, group: dict[str, Any], layout: ParamLayout, state: dict[str, Any]
    ) -> list[tuple[Segment, dict[str, Tensor]]]:
        """Views of ``state`` (one optimizer tensor's) split by the segments of ``layout``.

        Per-element kinds give the segment's range of the parameter; ``rows``/``cols`` give the
        whole parameter's factors (identical on every rank that holds a piece of it). Adapters use
        this to move state between layouts (checkpoint conversion, framework introspection)
        without knowing the optimizer's math. Keys not (yet) in ``state`` are left out.
        """
        pieces = []
        for seg in self._build_plan(group, layout).segments:
            views = {}
            for key, kind in self.state_kinds.items():
                value = state.get(key)
                if not isinstance(value, Tensor) or (kind == "dense") != (seg.geometry is None):
                    continue
                if kind == "factor":
                    views[key] = value[seg.factor_index : seg.factor_index + 1]
                else:
                    views[key] = getattr(seg, kind)(value)
            pieces.append((seg.segment, views))
        return pieces

    def new_state(self, group: dict[str, Any], layout: ParamLayout, device: torch.device) -> dict[str, Tensor]:
        """Zero state, sized for a tensor of ``layout``, for :meth:`segment_states` to fill
        (restoring state saved in another layout); ``step`` is 0."""
        plan = self._build_plan(group, layout)
        state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        for key, (numel, dtype) in self._expected_state(group, plan).items():
            state[key] = torch.zeros(numel, dtype=dtype, device=device)
        return state

    # --- helpers for subclasses ------------------------------------------------------------

    @staticmethod
    def _ensure(state: dict[str, Any], key: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        value = state.get(key)
        if value is None:
            value = torch.zeros(numel, dtype=dtype, device=device)
            state[key] = value
        return value

    def _advance_steps(self, items: list[StepItem]) -> list[int]:
        """Increment the per-parameter step counters (CPU float32 tensors, as in torch.optim) with
        one op; returns the new counts without reading the tensors back (see :class:`StepCounts`)."""
        counts = self.__dict__.setdefault("_step_counts", StepCounts())
        return counts.advance([item.state for item in items])


#: The layouts a state key can have, named after the :class:`SegmentPlan` accessor that slices
#: one segment's part out of the concatenated tensor. Per element of the segment's range:
#: ``elems`` (factored segments), ``dense`` (segments kept dense), ``bits`` (packed sign bits of
#: factored segments, 8 per byte, each segment starting on a fresh byte). Per parameter, whole:
#: ``rows`` and ``cols`` (the 2-D view's factors), ``factor`` (one value per factored segment).
STATE_KINDS = ("elems", "dense", "bits", "rows", "cols", "factor")


_NO_VERDICT = torch.tensor(math.inf, dtype=torch.float64)  # check_finite=False everywhere: nothing to report


def _distinct_groups(plans: Iterable[ParamPlan]) -> list[dist.ProcessGroup]:
    seen: dict[int, dist.ProcessGroup] = {}
    for plan in plans:
        for seg in plan.segments:
            if seg.group is not None:
                seen.setdefault(id(seg.group), seg.group)
    return list(seen.values())


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """Where tensors for collectives on ``group`` must live (CPU for gloo, else CUDA)."""
    backend = dist.get_backend(group)
    if backend == dist.Backend.GLOO:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite real number in the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be a finite number)")
    if low is not None and (value < low or (low_open and value <= low)):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (value > high or (high_open and value >= high)):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be {'<' if high_open else '<='} {high})")
