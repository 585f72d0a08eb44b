"""Keep DeepSpeed's optimizer-state helpers working on dist_memopt state.

``deepspeed.utils.safe_get_full_optimizer_state(param, key)`` (and the set/local variants) assume
Adam-like state: one value per element of the flat partition. DeepSpeed links those by shape
(ZeRO 1/2, BF16: ``_hp_mapping.optim_fragment``, filled once after the first step) or by position
(ZeRO 3: ``optimizer.state[flat][key].narrow(offset, partition_numel)``). dist_memopt keeps
per-element state only for some keys, concatenated per segment without padding, and factor keys of
another size; left alone, DeepSpeed would answer with misplaced elements, or raise on some ranks
while the others wait in a collective.

So, for the ZeRO wrapper of a dist_memopt optimizer only (per instance, nothing global):

* per-element keys (Alada ``exp_avg``; SMMF ``exp_avg``/``exp_avg_sq`` of parameters kept dense)
  are linked to views of this rank's piece, so get *and* set work at every stage;
* any other key (factors, packed signs) raises ``ValueError`` on every rank alike, naming the
  keys that work.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional

from torch import Tensor

from dist_memopt.integrations.deepspeed.layouts import PartitionLayout
from dist_memopt.optim.base import FactoredOptimizer
from dist_memopt.optim.state_layout import VALUE_KINDS
from dist_memopt.shard.spec import layout_of

__all__ = ["link_state_helpers", "undo_state_priming"]

def element_views(optimizer: FactoredOptimizer, layout: PartitionLayout) -> list[dict[str, Tensor]]:
    """Per segment of ``layout`` (in order), views of its per-element state keys."""
    group = optimizer.param_groups[layout.group_index]
    state = optimizer.state.get(layout.tensor, {})
    pieces = optimizer.segment_states(group, layout_of(layout.tensor), state)
    return [{k: v for k, v in views.items() if optimizer.state_kinds[k] in VALUE_KINDS} for _, views in pieces]


def _unsupported_key(optimizer: FactoredOptimizer, key: str, available: list[str]) -> ValueError:
    kind = type(optimizer).__name__
    if not optimizer.state:
        hint = "there is no optimizer state before the first step"
    elif not available:
        hint = "this parameter has no per-element state (its moments are all factored)"
    else:
        hint = f"keys with one value per element here: {available}"
    return ValueError(
        f"{kind} state '{key}' is not laid out per element, so DeepSpeed's full-optimizer-state "
        f"helpers cannot assemble it; {hint}. Factors (row_*, col_*, row, col, v0) and SMMF's packed "
        "signs are read from optimizer.state or a universal checkpoint (dist_memopt.integrations.deepspeed.universal)."
    )


def link_state_helpers(wrapper: Any, optimizer: FactoredOptimizer, layouts: list[PartitionLayout]) -> None:
    """Install the per-instance links described in the module docstring on ``wrapper``."""
    if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_partitioned_groups_flat"):
        _link_zero3(wrapper, optimizer, layouts)
    else:
        _link_fragments(wrapper, optimizer, layouts)


def undo_state_priming(wrapper: Any, optimizer: FactoredOptimizer) -> None:
    """Undo the zero-gradient step DeepSpeed's stage-0 fp16/bf16 wrapper takes at construction.

    ``FP16_UnfusedOptimizer`` primes Adam's state with ``optimizer.step()`` on zero gradients.
    For SMMF and Alada that step is not neutral: it counts as step 1 (shifting the schedules),
    applies weight decay to the fp32 masters, and gives Alada ``v0 = 0`` (p = q = 0: the next
    update divides by sqrt(eps)). Both keep no state before their first real step, so dropping
    what the priming step created and restoring the masters from the model is exact.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(wrapper, FP16_UnfusedOptimizer) and wrapper.optimizer is optimizer:
        optimizer.synchronize()
        optimizer.state.clear()
        wrapper.refresh_fp32_params()


# --- ZeRO 1/2 and BF16_Optimizer: _hp_mapping.optim_fragment --------------------------------


def _link_fragments(wrapper: Any, optimizer: FactoredOptimizer, layouts: list[PartitionLayout]) -> None:
    def link() -> None:
        for layout in layouts:
            for param, views in zip(layout.params, element_views(optimizer, layout)):
                mapping = getattr(param, "_hp_mapping", None)
                if mapping is not None:
                    mapping.optim_fragment = dict(views)
                _guard_param_helpers(param, optimizer, sorted(views))

    relink_mappings = wrapper._link_all_hp_params

    def link_all_hp_params() -> None:
        relink_mappings()  # DeepSpeed rebuilds every _hp_mapping (after loading a checkpoint)
        link()

    # DeepSpeed calls these by name on the instance: after __init__/loads, and after each step.
    wrapper._link_all_hp_params = link_all_hp_params
    wrapper._lazy_init_hp_params_optimizer_state = link
    optimizer.register_load_state_dict_post_hook(lambda _: link())
    link()


def _guard_param_helpers(param: Tensor, optimizer: FactoredOptimizer, keys: list[str]) -> None:
    """Make ``param.get/set_full_hp_param(key)`` refuse non-element keys on every rank alike."""
    for name in ("get_full_hp_param", "set_full_hp_param"):
        method = getattr(param, name, None)
        if method is None:
            continue
        original = getattr(method, "_dist_memopt_original", method)
        guarded = _guarded(original, optimizer, keys)
        setattr(param, name, guarded)


def _guarded(original: Callable, optimizer: FactoredOptimizer, keys: list[str]) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        key = kwargs.get("optim_state_key", args[-1] if args and isinstance(args[-1], str) else None)
        if key is not None and key not in keys:
            raise _unsupported_key(optimizer, key, keys)
        return original(*args, **kwargs)

    call._dist_memopt_original = original  # type: ignore[attr-defined]
    return call


# --- ZeRO 3: state read by position inside the sub-group's flat tensor ----------------------


def _link_zero3(wrapper: Any, optimizer: FactoredOptimizer, layouts: list[PartitionLayout]) -> None:
    where = {id(p): (layout, k) for layout in layouts for k, p in enumerate(layout.params)}
    original_partition = wrapper._get_fp32_opt_state_partition
    original_set = wrapper.set_full_hp_param
    original_set_local = wrapper.set_local_hp_param

    def piece(param: Tensor, key: str) -> Tensor:
        layout, k = where[id(param)]
        views = element_views(optimizer, layout)[k]
        if key not in views:
            raise _unsupported_key(optimizer, key, sorted(views))
        return views[key]

    def state_partition(self: Any, param: Tensor, release_swap_buffers: bool, optim_state_key: Optional[str] = None):
        if optim_state_key is None:
            return original_partition(param, release_swap_buffers)
        view = piece(param, optim_state_key)
        group_idx = self.grad_position[self.get_param_id(param)][0]
        per_rank = param.partition_numel()
        if view.numel() == per_rank:
            return view, group_idx
        padded = view.new_zeros(per_rank)  # the tail padding of the last ranks has no state
        padded[: view.numel()] = view
        return padded, group_idx

    def set_full_hp_param(self: Any, value: Tensor, param: Tensor, optim_state_key: Optional[str] = None) -> None:
        if optim_state_key is None:
            return original_set(value, param)
        view = piece(param, optim_state_key)
        layout, k = where[id(param)]
        spec = layout.segments[k].spec
        view.copy_(value.reshape(-1)[spec.start : spec.end])

    def set_local_hp_param(self: Any, value: Tensor, param: Tensor, optim_state_key: Optional[str] = None) -> None:
        if optim_state_key is None:
            return original_set_local(value, param)
        view = piece(param, optim_state_key)
        view.copy_(value.reshape(-1)[: view.numel()])

    wrapper._get_fp32_opt_state_partition = types.MethodType(state_partition, wrapper)
    wrapper.set_full_hp_param = types.MethodType(set_full_hp_param, wrapper)
    wrapper.set_local_hp_param = types.MethodType(set_local_hp_param, wrapper)
