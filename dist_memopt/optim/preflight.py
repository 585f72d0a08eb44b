"""The step's checks without host syncs: the non-finite verdict, layout agreement, step counts.

On an accelerator every ``.item()``, ``bool(t)`` or ``.tolist()`` makes the host wait for the
device. A step needs at most one: the verdict "is any gradient inf/NaN?", read after the
per-group all_reduce that carries it together with the layout fingerprint. Without
``check_finite`` and once the ranks have agreed on a layout, it needs none: the fingerprint is
verified again only when this rank's layout (or set of groups) changes. Step counters stay
CPU tensors (as in torch.optim) but are advanced in one call (one foreach op, or the fused CPU
kernels' module where the process has it), and their values are remembered instead of read back
each step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from dist_memopt.kernels.launch import KernelObserver, Reporter
from dist_memopt.shard.probe import agree, distinct_groups, group_device, kept_upload, with_signatures

__all__ = ["NonFiniteGradientError", "GradientCheck", "check_step", "nonfinite_candidate", "first_nonfinite", "StepCounts"]

T = TypeVar("T")

_NO_VERDICT = torch.tensor(math.inf, dtype=torch.float64)  # check_finite=False everywhere: nothing to report


class NonFiniteGradientError(RuntimeError):
    """A gradient holds inf or NaN; raised before any optimizer state or parameter changes."""


class GradientCheck:
    """The step's local non-finite verdict, and the gradients it covers.

    :meth:`during` computes it while running the step's bookkeeping: where every checked gradient
    belongs to a parameter the fused CPU kernels step, their C++ module scans them exactly for
    inf/NaN at the memory's speed (reported to the observer as the kernel ``cpu.finite_check``) on
    torch's other threads while this thread runs the bookkeeping, then helps finish the scan.
    Elsewhere the verdict comes from norms (:func:`nonfinite_candidate`), kept on the device.
    """

    def __init__(self, items: list[Any], param_groups: list[dict[str, Any]], observer: Optional[KernelObserver] = None,
                 kept: Optional[dict[Any, Any]] = None) -> None:
        """``kept``: the optimizer's dict where the check's constants stay on the device between
        steps (:func:`~dist_memopt.shard.probe.kept_upload`)."""
        self.kept = {} if kept is None else kept
        self.checked = [i for i, it in enumerate(items) if it.group.get("check_finite", True) and it.grad.numel() > 0]
        self.verdict = any(g.get("check_finite", True) for g in param_groups)  # the same on every rank
        self.grads = [items[i].grad for i in self.checked]
        # never loads the C++ module otherwise
        self._on_cpu_kernels = bool(self.checked) and all(items[i].kernel == "cpu" for i in self.checked)
        self._report = Reporter(observer, "cpu.")
        self._device = items[0].grad.device if items else torch.device("cpu")
        #: 0-d float64: the first checked item index whose gradient is not finite, inf if none
        self.candidate = _NO_VERDICT

    def during(self, prologue: Callable[[], T]) -> T:
        """``prologue()`` (which must change no state), with :attr:`candidate` computed meanwhile."""
        if not self.verdict:
            return prologue()
        if not self._on_cpu_kernels:
            self.candidate = nonfinite_candidate(self.grads, self.checked, self._device, self.kept)
            return prologue()
        self._report.record("finite_check", sum(t.numel() * t.element_size() for t in self.grads), 0)
        if not self._report.executing:
            result, first = prologue(), -1
        else:
            from dist_memopt.kernels.cpu_build import cpu_kernels

            first, result = cpu_kernels().first_nonfinite_during(self.grads, prologue)
        self.candidate = torch.full((), math.inf if first < 0 else float(self.checked[first]), dtype=torch.float64)
        return result


def check_step(kind: str, items: list[Any], reducer: Any, agreed: dict[int, int], check: GradientCheck) -> None:
    """Raise, on every rank alike and before any state changes, on bad gradients or layouts.

    ``check`` holds the local verdict: whether a gradient is not finite. One small all_reduce
    per process group (:func:`~dist_memopt.shard.probe.agree`) carries that verdict and a
    fingerprint of the statistic layout. One host sync reads the verdict (none without
    ``check_finite``, once the ranks agreed on this layout: ``agreed`` remembers it per group);
    only a non-finite verdict costs a second, exact round.
    """
    checked, verdict, candidate = check.checked, check.verdict, check.candidate
    specs = [seg.segment.spec for it in items for seg in it.plan.segments]
    fingerprints = with_signatures(reducer.fingerprints(), specs)
    suspects = []
    groups = distinct_groups(specs)
    for group in groups:
        fingerprint = fingerprints.get(id(group), 0)
        if not verdict and agreed.get(id(group)) == fingerprint:
            continue
        smallest, same = agree(candidate, fingerprint, group, group_device(group), check.kept)
        if not same:
            raise RuntimeError(
                f"{kind}: the ranks of a process group (this is rank {dist.get_rank()}) step different "
                "parameters, shapes or placements; build the optimizer from the same model, wrapped "
                "the same way (same device mesh and placements), on every rank"
            )
        agreed[id(group)] = fingerprint
        if smallest != math.inf:
            suspects.append((group, fingerprint))
    if not groups and verdict and candidate.item() != math.inf:
        suspects.append((None, 0))
    if not suspects:
        return
    first = first_nonfinite([items[i].grad for i in checked])  # exact, on suspicion only
    bad = math.inf if first is None else float(checked[first])
    for group, fingerprint in suspects:
        if group is not None:
            bad = min(bad, agree(torch.tensor(bad), fingerprint, group, group_device(group))[0])
    if bad != math.inf:
        item = items[int(bad)]
        raise NonFiniteGradientError(
            f"non-finite gradient (inf or NaN) for {item.name} of shape "
            f"{tuple(item.param.shape)}; no parameter or optimizer state was changed. "
            "Skip the step, lower the learning rate or use loss scaling; pass "
            "check_finite=False to skip this check."
        )


def nonfinite_candidate(tensors: list[Tensor], indices: list[int], device: torch.device, kept: Optional[dict[Any, Any]] = None) -> Tensor:
    """0-d float64 tensor on ``device``: the first ``indices[i]`` whose tensor's 2-norm is not
    finite, inf if none (no sync).

    A finite norm proves a tensor finite; a non-finite one is a real inf/NaN or finite values
    whose squares overflow, which :func:`first_nonfinite` tells apart (only then, off the fast path).
    ``indices`` go to the device once and stay in ``kept`` while they are the same.
    """
    if not tensors:
        return torch.full((), math.inf, dtype=torch.float64, device=device)
    norms = torch.stack(torch._foreach_norm(tensors, 2)).to(device)
    where = kept_upload(kept, "checked", tuple(map(float, indices)), device)
    finite = (norms - norms) == 0  # isfinite in two ops: inf - inf and nan - nan are nan
    return torch.where(finite, math.inf, where).min()


def first_nonfinite(tensors: list[Tensor]) -> Optional[int]:
    """Index of the first tensor holding an inf or NaN, else None (exact; syncs per suspect).

    One fused 2-norm per tensor clears almost every tensor; only tensors whose norm is not finite
    get the exact elementwise test. The inf-norm would be exact in one pass but is about 6x slower
    on CPU.
    """
    if not tensors:
        return None
    norms = torch.stack(torch._foreach_norm(tensors, 2))
    for index in (~torch.isfinite(norms)).nonzero().flatten().tolist():
        if not bool(torch.isfinite(tensors[index]).all()):
            return index
    return None


class StepCounts:
    """Advance the per-parameter ``step`` tensors with one op and know their values without reading them.

    A value is remembered with the tensor's version counter; a tensor changed by anyone else
    (``load_state_dict``, a checkpoint loaded in place) has another version and is read once.
    """

    def __init__(self) -> None:
        self._known: dict[int, tuple[Tensor, int, int]] = {}  # id(step) -> (step, version, value)

    def upcoming(self, states: list[dict[str, Any]]) -> list[int]:
        """The counts :meth:`advance` will give these states (changes nothing)."""
        return [(0 if state.get("step") is None else self._value(state["step"])) + 1 for state in states]

    def advance(self, states: list[dict[str, Any]], upcoming: Optional[list[int]] = None) -> list[int]:
        """Increment every state's ``step`` (created at 0 where missing); returns the new counts
        (``upcoming``: what :meth:`upcoming` returned for these states, nothing changed since)."""
        steps = []
        for state in states:
            if state.get("step") is None:
                state["step"] = step = torch.tensor(0.0, dtype=torch.float32)
                self._known[id(step)] = (step, step._version, 0)
            steps.append(state["step"])
        values = upcoming if upcoming is not None else [self._value(step) + 1 for step in steps]
        if steps:
            _add_one(steps)
        for step, value in zip(steps, values):
            self._known[id(step)] = (step, step._version, value)
        return values

    def clear(self) -> None:
        """Forget every remembered value (the states were replaced)."""
        self._known.clear()

    def _value(self, step: Tensor) -> int:
        entry = self._known.get(id(step))
        if entry is not None and entry[0] is step and entry[1] == step._version:
            return entry[2]
        value = int(step.item())
        self._known[id(step)] = (step, step._version, value)  # read once
        return value


def _add_one(steps: list[Tensor]) -> None:
    """``torch._foreach_add_(steps, 1.0)``; through the fused CPU kernels' module where this process
    has loaded it (no build for that), which adds to CPU float32 counters without a dispatch each."""
    from dist_memopt.kernels.cpu_build import loaded_cpu_kernels

    kernels = loaded_cpu_kernels()
    if kernels is None or not kernels.advance_steps(steps, 1.0):
        torch._foreach_add_(steps, 1.0)
