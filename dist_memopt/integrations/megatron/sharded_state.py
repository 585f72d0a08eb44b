"""Megatron distributed checkpointing (``sharded_state_dict``) of SMMF and Alada state.

Megatron saves Adam's moments as ShardedTensors that borrow the model parameter's sharding
metadata; the distributed optimizer's shard of a parameter is a flattened range of it. SMMF and
Alada hold two kinds of state per parameter, and each maps onto a checkpoint like this:

- per-element state (SMMF's signs, one int8 per element, and the dense moments of vectors kept
  with ``vector_reshape=False``; Alada's momentum) and the fp32 main parameter: a tensor of the
  parameter's TP=1 shape under ``optimizer.state.<name>.<model key>``, of which each rank holds
  the elements it steps — its tensor-parallel piece (one or two boxes: a gated ``linear_fc1``
  holds a gate and an up block), cut to its data-parallel range by the distributed optimizer (a
  range of a box's flattening is a few sub-boxes); without either, all of it, replicated like the
  parameter;
- the row/column factors, Alada's ``v0`` and the step: sized by the parameter's TP=1 shape and
  identical on every rank that holds a piece of it, a whole flat tensor under the same naming,
  written by one rank.

Parameters Megatron stacks under one key (a transformer block's layers) keep its stacking axes. The
format depends only on the model's TP=1 parameters: a checkpoint loads on another number of
data-parallel or tensor-parallel ranks, and into the distributed optimizer or a whole-parameter one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dist_memopt.integrations.megatron.tensor_parallel import Box, TPPiece
from dist_memopt.optim.checkpoint import per_element_keys
from dist_memopt.optim.base import FactoredOptimizer
from dist_memopt.shard.spec import layout_of

__all__ = ["StateEntry", "range_boxes", "SHARDING_TYPE", "sharded_param_state", "load_param_state", "group_settings", "restore_group_settings"]

SHARDING_TYPE = "dist_memopt_model_space"
PREFIX = "optimizer.state"
MAIN_PARAM_KEY = "fp32_param"


@dataclass(frozen=True)
class StateEntry:
    """One tensor the inner optimizer steps, and which elements of which model parameter it holds.

    ``elements`` is the range of ``model_param``'s (local) row-major flattening held here, or None
    for all of it, replicated over data-parallel ranks; ``piece`` is where ``model_param`` lies in
    the TP=1 parameter (None: it is the whole parameter). ``tensor`` (the fp32 main parameter, or
    the model parameter itself in fp32 training) is saved as ``fp32_param`` so that a checkpoint
    loads into any of Megatron's optimizer wrappers.
    """

    tensor: Tensor
    model_param: Tensor
    elements: Optional[tuple[int, int]]
    piece: Optional[TPPiece] = None
    tp_rank: Optional[int] = None  # the rank in the group ``piece`` is split over (None: the caller's tp_rank)

    def boxes(self) -> tuple[torch.Size, list[Box]]:
        """The TP=1 shape, and the boxes of it this entry holds, in the order of its elements."""
        piece = self.piece
        if piece is None or not piece.is_split:
            shape = tuple(self.model_param.shape) or (1,)  # a 0-d parameter as one element
            piece = TPPiece(torch.Size(shape), (Box((0,) * len(shape), shape),))
        lo, hi = self.elements if self.elements is not None else (0, self.model_param.numel())
        boxes, base = [], 0
        for box in piece.boxes:
            boxes += range_boxes(box, max(lo - base, 0), min(hi - base, box.numel))
            base += box.numel
        return piece.global_shape, boxes


def range_boxes(box: Box, lo: int, hi: int) -> list[Box]:
    """Elements ``[lo, hi)`` of ``box``'s row-major flattening as sub-boxes, in order (a partial
    first slice, whole slices and a partial last slice along each dim: at most 2·ndim − 1)."""
    if lo >= hi:
        return []
    if not box.shape:
        return [box]
    inner = box.numel // box.shape[0]
    first, last = lo // inner, (hi - 1) // inner

    def within(index: int, a: int, b: int) -> list[Box]:
        rest = range_boxes(Box(box.offset[1:], box.shape[1:]), a, b)
        return [Box((box.offset[0] + index, *r.offset), (1, *r.shape)) for r in rest]

    if first == last:
        return within(first, lo - first * inner, hi - first * inner)
    out: list[Box] = []
    if lo % inner:
        out += within(first, lo % inner, inner)
        first += 1
    whole_end = last if hi % inner else last + 1
    if whole_end > first:
        out.append(Box((box.offset[0] + first, *box.offset[1:]), (whole_end - first, *box.shape[1:])))
    if hi % inner:
        out += within(last, 0, hi % inner)
    return out


def _checkpoint_states(optimizer: FactoredOptimizer) -> list[dict[str, Any]]:
    """Each optimizer tensor's state in its checkpoint form, in ``param_groups`` order.

    A tensor not stepped yet gets zeros and step 0, which the optimizers treat exactly as no state.
    """
    saved = optimizer.state_dict()["state"]
    states, index = [], 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = saved.get(index)
            if state is None:
                zeros = optimizer.new_state(group, layout_of(param), param.device)
                state = optimizer.checkpoint_form(group, param, zeros, "megatron")
            states.append(state)
            index += 1
    return states


def _model_metadata(model_sharded_state_dict: dict) -> dict[int, Any]:
    """id(model parameter) -> its ShardedTensor (or ShardedTensorFactory) in the model's state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    return {id(sh.data): sh for sh in nested_values(sharded)}


def _stacking(meta: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """The axes Megatron prepends to a parameter's key (e.g. the layer index of a transformer
    block): their number, global sizes and this parameter's offsets along them."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(meta, ShardedTensorFactory):  # e.g. a fused gate/up projection: ask what it builds
        meta = next(iter(nested_values(meta.build())))
    k = meta.prepend_axis_num
    return k, tuple(meta.global_shape[:k]), tuple(meta.global_offset[:k])


def _boxed(meta: Any, key: str, data: Tensor, global_shape: tuple[int, ...], boxes: list[Box], replica_id: Any) -> list[Any]:
    """``data`` (the boxes' elements, box after box) as ShardedTensors of a tensor of
    ``global_shape``, stacked (and keyed) like the model parameter ``meta`` describes.

    The boxes of different ranks form no regular grid (an uneven sharding), which Megatron hands to
    torch.distributed.checkpoint as is. Megatron translates only the local shape of such tensors,
    so the stacking axes are explicit size-1 axes of the data rather than prepended ones.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    k, lead_shape, lead_offset = _stacking(meta)
    flat, out, at = data.reshape(-1), [], 0
    for box in boxes:
        part = flat[at : at + box.numel].reshape((1,) * k + tuple(box.shape))
        at += box.numel
        out.append(ShardedTensor(
            f"{PREFIX}.{key}.{meta.key}", part, part.dtype, tuple(part.shape), (*lead_shape, *global_shape),
            (*lead_offset, *box.offset), None, replica_id,
        ))
    return out


def _replica_tuple(replica_id: Any) -> tuple:
    return tuple(replica_id) if isinstance(replica_id, (tuple, list)) else (replica_id,)


def _joined(value: Any) -> Tensor:
    """A loaded state tensor: the boxes' parts (a list) put back in order, flat."""
    if isinstance(value, (list, tuple)):
        return torch.cat([v.reshape(-1) for v in value]) if value else torch.zeros(0)
    return value.reshape(-1)


def sharded_param_state(
    optimizer: FactoredOptimizer, entries: list[StateEntry], model_sharded_state_dict: dict, instance_id: int = 0,
    tp_rank: int = 0,
) -> dict[int, dict[str, Any]]:
    """Per entry (in ``param_groups`` order), its state as ShardedTensors (see the module docstring).

    ``entries`` must list every tensor of ``optimizer.param_groups``, in order. Ranks that hold no
    element of a parameter still describe its factors (one of them writes them); ``tp_rank`` is
    this rank's tensor-parallel rank (the factors of a split parameter are replicated over it).
    """
    from megatron.core.dist_checkpointing.optimizer import KEEP_VARS_HINT

    metadata = _model_metadata(model_sharded_state_dict)
    elementwise = per_element_keys(optimizer.state_kinds)
    result: dict[int, dict[str, Any]] = {}
    for index, (entry, state) in enumerate(zip(entries, _checkpoint_states(optimizer), strict=True)):
        meta = metadata.get(id(entry.model_param))
        if meta is None:
            raise ValueError(f"a parameter of shape {tuple(entry.model_param.shape)} is not in the model's sharded state dict.{KEEP_VARS_HINT}")
        global_shape, boxes = entry.boxes()
        if entry.elements is None:  # the whole piece, replicated like the parameter
            replica_id = meta.replica_id
        else:  # a distinct range on each data-parallel rank: replicated only across optimizer instances
            replica_id = (*meta.replica_id[:2], instance_id)
        split = entry.piece is not None and entry.piece.is_split
        piece_rank = tp_rank if entry.tp_rank is None else entry.tp_rank
        factor_replica = (*_replica_tuple(meta.replica_id), piece_rank if split else 0)
        tensors: dict[str, Any] = {}
        for key, value in dict(state, **{MAIN_PARAM_KEY: entry.tensor.detach()}).items():
            if key in elementwise or key == MAIN_PARAM_KEY:
                if boxes:
                    tensors[key] = _boxed(meta, key, value, tuple(global_shape), boxes, replica_id)
            else:  # factors, v0, step: identical wherever the parameter is, saved once
                tensors[key] = _boxed(meta, key, value, (value.numel(),), [Box((0,), (value.numel(),))], factor_replica)
        result[index] = tensors
    return result


@torch.no_grad()
def load_param_state(optimizer: FactoredOptimizer, entries: list[StateEntry], param_state: dict) -> None:
    """Inverse of :func:`sharded_param_state`: main parameters and optimizer state, from loaded tensors."""
    templates = _checkpoint_states(optimizer)
    state_dict = optimizer.state_dict()
    loaded: dict[int, dict[str, Any]] = {}
    for index, (entry, template) in enumerate(zip(entries, templates, strict=True)):
        saved = dict(param_state.get(index) or {})
        main = saved.pop(MAIN_PARAM_KEY, None)
        if main is not None:
            entry.tensor.copy_(_joined(main).reshape(entry.tensor.shape))
        missing = sorted(set(template) - set(saved) - set(per_element_keys(optimizer.state_kinds)))
        if missing:
            raise ValueError(f"the checkpoint lacks optimizer state {missing} of parameter {index} (saved by another optimizer?)")
        # flat, as the optimizer holds them (saved with the stacking axes of a layer's parameters);
        # per-element state of an empty range was not saved: the template's empty tensor stands in
        state = {key: _joined(saved.get(key, value)) for key, value in template.items()}
        state["step"] = state["step"].reshape(()).to("cpu", torch.float32)
        if float(state["step"]) > 0:
            loaded[index] = state
    state_dict["state"] = loaded
    optimizer.load_state_dict(state_dict)


def group_settings(optimizer: FactoredOptimizer) -> list[dict[str, Any]]:
    """The param groups' hyperparameters (without their tensors): the non-sharded part of a checkpoint."""
    return [{k: v for k, v in group.items() if k not in ("params", "param_names")} for group in optimizer.param_groups]


def restore_group_settings(optimizer: FactoredOptimizer, saved_groups: list[dict[str, Any]]) -> None:
    """Put saved hyperparameters back, matching groups as Megatron does (wd_mult, lr_mult, ...)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    def identity(group: dict[str, Any]) -> tuple:
        return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys)

    by_identity = {identity(group): group for group in saved_groups}
    for group in optimizer.param_groups:
        saved = by_identity.get(identity(group))
        if saved is None:
            raise ValueError(
                f"no saved parameter group matches {dict(zip(param_group_identifier_keys, identity(group)))}; "
                f"the checkpoint has {sorted(by_identity)}"
            )
        group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
