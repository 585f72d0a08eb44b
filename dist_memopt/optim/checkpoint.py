"""How optimizer state looks in a checkpoint, per the framework that shards the parameter.

Inside the optimizer, per-element state is compact: SMMF's signs are packed 8 per byte and every
per-element tensor is the concatenation of the parameter's segments. Checkpoint machinery of the
sharding frameworks expects otherwise, so each layout names a style (``ParamLayout.checkpoint``):

- ``"compact"`` (plain tensors, DDP): saved as held.
- any registered :class:`CheckpointStyle`: per-element state is *expanded*, laid out like the
  optimizer tensor's local data (one entry per element, signs as the style's dtype), then the
  style's ``finish`` gives it the framework's form; on load, every style's ``restore`` undoes its
  own wrapping before the state is compacted again. The adapters register theirs —
  ``"dtensor"`` (:mod:`dist_memopt.integrations.dtensor`), ``"fsdp1"``
  (:mod:`dist_memopt.integrations.fsdp`), ``"megatron"`` (:mod:`dist_memopt.integrations.megatron`) —
  the way they register layout resolvers, so this module names no framework.

Expanded signs are 1 (M >= 0) or 0, in the style's dtype; never the packed uint8 form, which is how
they are told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from dist_memopt.optim.bits import pack_signs, packed_numel, unpack_signs
from dist_memopt.optim.state_layout import per_element_keys
from dist_memopt.shard.spec import local_tensor

__all__ = ["expand_state", "compact_state", "per_element_keys", "CheckpointStyle", "register_checkpoint_style"]

PACKED_SIGN_DTYPE = torch.uint8


def _as_expanded(param: Tensor, state: dict[str, Any], per_element: dict[str, str]) -> dict[str, Any]:
    return state


def _as_loaded(state: dict[str, Any]) -> dict[str, Any]:
    return state


@dataclass(frozen=True)
class CheckpointStyle:
    """The form one framework's checkpoint code wants a parameter's optimizer state in.

    ``sign_dtype``: the dtype of expanded signs. ``finish(param, state, per_element_keys)`` turns
    the expanded state (flat, local) into the framework's form; ``restore(state)`` undoes what
    ``finish`` added on load (it sees every loaded state, whatever its style, and must leave
    others unchanged).
    """

    name: str
    sign_dtype: torch.dtype
    finish: Callable[[Tensor, dict[str, Any], dict[str, str]], dict[str, Any]] = _as_expanded
    restore: Callable[[dict[str, Any]], dict[str, Any]] = _as_loaded


_STYLES: dict[str, CheckpointStyle] = {}


def register_checkpoint_style(style: CheckpointStyle) -> None:
    """Make ``style.name`` usable as a layout's ``checkpoint`` (adapters call this on import)."""
    _STYLES[style.name] = style


def _segments(plan: Any, kind: str) -> list:
    """The segments a per-element kind covers: dense ones for ``dense``, factored ones otherwise."""
    return plan.dense_segments if kind == "dense" else plan.factored


def expand_state(plan: Any, param: Tensor, state: dict[str, Any], state_kinds: dict[str, str], style: str) -> dict[str, Any]:
    """Compact state -> the checkpoint form of ``style`` (a new dict; the input is not changed)."""
    state = dict(state)
    if style == "compact":
        return state
    if style not in _STYLES:
        raise ValueError(f"unknown checkpoint style {style!r} (registered: {sorted(_STYLES)})")
    form = _STYLES[style]
    local = local_tensor(param)
    per_element = per_element_keys(state_kinds)
    for key, kind in per_element.items():
        value = state.get(key)
        if value is None:
            continue
        dtype = form.sign_dtype if kind == "bits" else torch.float32
        out = torch.zeros(local.numel(), dtype=dtype, device=value.device)
        for seg in _segments(plan, kind):
            n = seg.segment.numel
            piece = (unpack_signs(seg.bits(value), n) > 0).to(dtype) if kind == "bits" else getattr(seg, kind)(value)
            out[seg.segment.offset : seg.segment.offset + n] = piece
        state[key] = out
    return form.finish(param, state, per_element)


def compact_state(
    plan: Any,
    param: Tensor,
    state: dict[str, Any],
    state_kinds: dict[str, str],
    take: Optional[Callable[[Tensor], Tensor]] = None,
) -> dict[str, Any]:
    """Any checkpoint form -> compact state. ``take`` picks this shard's elements out of gathered
    full tensors (:meth:`ShardSpec.take`)."""
    state = dict(state)
    for form in _STYLES.values():
        state = form.restore(state)
    local = local_tensor(param)
    for key, kind in per_element_keys(state_kinds).items():
        value = state.get(key)
        if not isinstance(value, Tensor):
            continue
        value = local_tensor(value).reshape(-1)
        if kind == "bits" and value.dtype == PACKED_SIGN_DTYPE:
            continue  # packed: already compact
        if value.numel() != local.numel():
            if take is not None and value.numel() == param.numel():
                value = take(value)  # a gathered full tensor
            elif kind != "bits":
                continue  # the compact concatenation of segments
            else:
                raise ValueError(f"checkpointed '{key}' has {value.numel()} elements, expected {local.numel()}")
        segments = _segments(plan, kind)
        if kind == "bits":
            packed = torch.zeros(sum(packed_numel(s.segment.numel) for s in segments), dtype=torch.uint8, device=value.device)
            for seg in segments:
                pack_signs(seg.local(value) > 0, seg.bits(packed))
            state[key] = packed
        else:
            pieces = [seg.local(value) for seg in segments]
            state[key] = (torch.cat(pieces) if pieces else value[:0]).to(torch.float32)
    return state
