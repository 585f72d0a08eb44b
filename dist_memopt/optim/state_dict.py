"""``state_dict`` / ``load_state_dict`` of the factored optimizers, and state per segment.

The optimizer holds its state compact (packed signs, segments concatenated); ``state_dict()``
hands out the form the parameter's framework checkpoints (see :mod:`dist_memopt.optim.checkpoint`),
``load_state_dict`` takes any of those forms back, checked against this optimizer's layout before
anything changes, and :meth:`StateDictMixin.segment_states` / :meth:`StateDictMixin.new_state` let
adapters move state between layouts without knowing the math.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from dist_memopt.optim.checkpoint import compact_state, expand_state
from dist_memopt.optim.state_layout import outside_keys
from dist_memopt.shard.spec import ParamLayout, Segment, layout_of, local_tensor

__all__ = ["StateDictMixin"]


class StateDictMixin:
    """The state-dict half of :class:`~dist_memopt.optim.base.FactoredOptimizer`."""

    # --- state dict ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()``, with the state of sharded parameters in the form
        their framework's checkpoint code expects (see :mod:`dist_memopt.optim.checkpoint`)."""
        self.synchronize()
        sd = super().state_dict()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if index in sd["state"]:
                    plan = self._plan(group, param)
                    style = layout_of(param).checkpoint
                    state = {**sd["state"][index], **self._state_outside(group, param, plan)}
                    sd["state"][index] = expand_state(plan, param, state, self.state_kinds, style)
                index += 1
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like :meth:`torch.optim.Optimizer.load_state_dict`, keeping fp32 state fp32.

        Checks that the state fits this optimizer type and these parameters' layouts; on any
        mismatch raises ``ValueError`` and leaves the current state and groups untouched. A
        numeric ``step`` (torch's older format) becomes a tensor; state kept outside the optimizer
        (Alada's in-gradient momentum) goes back where it lives.
        """
        self.synchronize()
        self.__dict__.pop("_step_caches", None)  # what the previous steps kept was built on the old state
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
        outside: list[tuple[dict[str, Any], Tensor, dict[str, Tensor]]] = []
        lacking: list[str] = []
        for key, value in state_dict["state"].items():
            group, i, index = owners[key]
            param = group["params"][i]
            name = self._param_name(group, i, index)
            value = _tensor_step(self._compact_loaded(group, param, value), name)
            lacking += [f"'{k}' of {name}" for k in self._check_loaded_state(group, param, value, name)]
            moved = {k: value.pop(k) for k in outside_keys(self.state_layout) if k in value}
            if moved:
                outside.append((group, param, moved))
            new_state[param] = {
                k: (v.to(device=local_tensor(param).device) if isinstance(v, Tensor) else deepcopy(v))
                for k, v in value.items()
            }
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for group, param, moved in outside:
            self._restore_outside(group, param, self._plan(group, param), moved)
        if lacking:
            warnings.warn(
                f"{kind}.load_state_dict: the state dict lacks {', '.join(lacking[:3])}"
                f"{f' and {len(lacking) - 3} more' if len(lacking) > 3 else ''} (saved by an older "
                "dist_memopt, or with momentum_in_grad=False?): the momentum now in .grad is kept as it is",
                UserWarning, stacklevel=2,
            )
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _compact_loaded(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """Loaded state in any checkpoint form -> the compact form held in ``self.state``."""
        layout = layout_of(param)
        single = layout.segments[0].spec if len(layout.segments) == 1 else None
        take = single.take if single is not None else None
        return compact_state(self._build_plan(group, layout), param, state, self.state_kinds, take)

    def _check_loaded_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any], name: str) -> list[str]:
        """Raise ValueError unless ``state`` fits this parameter; returns the keys kept outside the
        optimizer that it lacks (state dicts saved before they were carried)."""
        kind = type(self).__name__
        if not state:
            return []  # a parameter that has not been stepped yet
        plan = self._build_plan(group, layout_of(param))
        expected = dict(self._expected_state(group, plan, saved=True), step=(1, torch.float32))
        optional = set(outside_keys(self.state_layout))
        if not set(expected) - optional <= set(state) <= set(expected):
            raise ValueError(
                f"loaded state of {name} has keys {sorted(state)}, {kind} expects {sorted(expected)} "
                f"for it: the state dict was saved by another optimizer, for another shape or with "
                "other settings (beta=None, vector_reshape, momentum_in_grad)"
            )
        for key, (numel, dtype) in expected.items():
            value = state.get(key)
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"loaded state '{key}' of {name} is a {type(value).__name__}, not a tensor")
            if local_tensor(value).numel() != numel or value.dtype != dtype:
                raise ValueError(
                    f"loaded state '{key}' of {name} has {local_tensor(value).numel()} elements of "
                    f"{value.dtype}, {kind} expects {numel} of {dtype}: saved for another shape, "
                    "sharding or optimizer"
                )
        return sorted(set(expected) - set(state))

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

    def checkpoint_form(self, group: dict[str, Any], param: Tensor, state: dict[str, Any], style: str | None = None) -> dict[str, Any]:
        """``state`` (compact, of ``param``) in the checkpoint form ``style`` (default: the one its
        layout names), as :meth:`state_dict` gives it."""
        layout = layout_of(param)
        return expand_state(self._build_plan(group, layout), param, state, self.state_kinds, style or layout.checkpoint)

    def new_state(self, group: dict[str, Any], layout: ParamLayout, device: torch.device) -> dict[str, Tensor]:
        """Zero state, sized for a tensor of ``layout``, for :meth:`segment_states` to fill
        (restoring state saved in another layout); ``step`` is 0."""
        plan = self._build_plan(group, layout)
        state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}  # held keys only
        for key, (numel, dtype) in self._expected_state(group, plan).items():
            state[key] = torch.zeros(numel, dtype=dtype, device=device)
        return state


def _tensor_step(state: dict[str, Any], name: str) -> dict[str, Any]:
    """``state`` with a numeric ``step`` (a Python number or a one-element tensor of another dtype,
    as torch.optim loads) as the CPU float32 tensor these optimizers count in."""
    step = state.get("step")
    if step is None or (isinstance(step, Tensor) and step.dtype == torch.float32 and step.numel() == 1):
        return state
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex():
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
        raise ValueError(f"loaded state 'step' of {name} is {step!r}: expected a step count (a tensor or a number >= 0)")
    return {**state, "step": torch.tensor(float(step), dtype=torch.float32)}
