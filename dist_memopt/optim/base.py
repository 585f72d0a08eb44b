"""Machinery shared by SMMF and Alada: layouts, checks, statistic reduction, state dicts.

A subclass writes its math once, per segment, on local fp32 tensors and a
:class:`~dist_memopt.shard.geometry.RangeGeometry`; this base class finds every parameter's
segments (plain tensor, DTensor shard, FSDP1 flat shard, ZeRO partition), validates gradients
before any state changes, hands out statistic slots that a single all_reduce per process group
completes, and keeps ``state_dict`` / ``load_state_dict`` conventional and safe.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from dist_memopt.optim.bits import packed_numel
from dist_memopt.optim.plan import ParamPlan, SegmentBatches, SegmentPlan, StepItem, decay_weights
from dist_memopt.optim.preflight import StepCounts, agree, first_nonfinite, nonfinite_candidate
from dist_memopt.optim.state_dict import StateDictMixin
from dist_memopt.optim.state_layout import STATE_KINDS, StateKey, expected_state, kinds_of
from dist_memopt.shard.reduce import StatReducer
from dist_memopt.shard.runs import view_geometry
from dist_memopt.shard.spec import ParamLayout, grad_like_param, layout_of, local_tensor

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
    "check_ignored_keys",
    "IGNORED_FLAGS",
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


def _flat_fp32(t: Tensor) -> Tensor:
    """A flat fp32 view of ``t`` when possible, else a flat fp32 copy."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.view(-1)
    return t.reshape(-1).to(torch.float32)


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
    #: largest segment (elements) the fast path stacks with others; bigger ones gain nothing
    batch_numel: int = 1 << 16
    #: param-group keys of other optimizers that this one would silently ignore -> what to write
    #: instead; :data:`IGNORED_FLAGS` are refused only when truthy (``fused=False`` is harmless)
    ignored_keys: dict[str, str] = {}

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

    def _expected_state(self, group: dict[str, Any], plan: ParamPlan) -> dict[str, tuple[int, torch.dtype]]:
        """State keys this parameter must hold, with element counts and dtypes (from :attr:`state_layout`)."""
        return expected_state(self.state_layout, group, plan)

    def _reserve(self, items: list[StepItem], reducer: StatReducer) -> Any:
        """Reserve statistic slots for this step; must not change any state."""
        raise NotImplementedError

    def _apply(self, items: list[StepItem], reducer: StatReducer, reserved: Any) -> None:
        """Update state and weights (gradients and layouts already checked on every rank)."""
        raise NotImplementedError

    def _check_loop(self) -> None:
        """Raise if the training loop broke a contract this optimizer relies on (before any change)."""

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
                plan = self._named_plan(group, p, i)  # on every rank, in the same order
                if p.grad is None:
                    # A rank whose shard of a parameter is empty gets no gradient from FSDP1
                    # (use_orig_params=True); it must still post that parameter's statistics.
                    if data.numel() or not any(s.group is not None for s in plan.segments):
                        continue
                    grad = data
                else:
                    placed = grad_like_param(p, p.grad)
                    if placed is not p.grad:
                        p.grad = placed  # the optimizer's view of it is the parameter's shard
                    grad = local_tensor(placed)
                name = self._param_name(group, i)
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
        fingerprints = _with_signatures(reducer.fingerprints(), items)
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
                    f"{dist.get_rank()}) step different parameters, shapes or placements; build the "
                    "optimizer from the same model, wrapped the same way (same device mesh and "
                    "placements), on every rank"
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_pending", None)
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

    def _advance_steps(self, items: list[StepItem]) -> list[int]:
        """Increment the per-parameter step counters (CPU float32 tensors, as in torch.optim) with
        one op; returns the new counts without reading the tensors back (see :class:`StepCounts`)."""
        counts = self.__dict__.setdefault("_step_counts", StepCounts())
        return counts.advance([item.state for item in items])


_NO_VERDICT = torch.tensor(math.inf, dtype=torch.float64)  # check_finite=False everywhere: nothing to report


def _with_signatures(fingerprints: dict[int, int], items: list[StepItem]) -> dict[int, int]:
    """Fold each segment's layout signature (placements, mesh shape) into its groups' fingerprints:
    holders that disagree on how a parameter is divided would post sums of mismatched pieces."""
    result = dict(fingerprints)
    for item in items:
        for seg in item.plan.segments:
            signature = seg.segment.spec.signature
            if signature:
                for group in seg.segment.spec.groups:
                    key = id(group)
                    result[key] = hash((result.get(key, 0), zlib.crc32(signature.encode()))) % (1 << 52)
    return result


def _distinct_groups(plans: Iterable[ParamPlan]) -> list[dist.ProcessGroup]:
    seen: dict[int, dist.ProcessGroup] = {}
    for plan in plans:
        for seg in plan.segments:
            for group in seg.segment.spec.groups:
                seen.setdefault(id(group), group)
    return list(seen.values())


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """Where tensors for collectives on ``group`` must live (CPU for gloo, else CUDA)."""
    backend = dist.get_backend(group)
    if backend == dist.Backend.GLOO:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite real number in the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be a finite number)")
    if low is not None and (value < low or (low_open and value <= low)):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (value > high or (high_open and value >= high)):
        raise ValueError(f"Invalid {name}{where}: {value!r} (must be {'<' if high_open else '<='} {high})")
