"""How optimizer state looks in a checkpoint, per the framework that shards the parameter.

Inside the optimizer, per-element state is compact: SMMF's signs are packed 8 per byte and every
per-element tensor is the concatenation of the parameter's segments. Checkpoint machinery of the
sharding frameworks expects otherwise, so each layout names a style (``ParamLayout.checkpoint``):

- ``"compact"`` (plain tensors, DDP): saved as held.
- ``"dtensor"`` (FSDP2, HSDP): per-element state becomes a DTensor shaped and placed like the
  parameter (signs as int8, one per element), so torch.distributed.checkpoint saves it sharded and
  reshards it on load; row/column factors are global-size, identical on every rank, saved as is.
- ``"megatron"`` (Megatron-core's DistributedOptimizer, FP32 and mixed-precision optimizers):
  per-element state is laid out like the optimizer tensor's local data (signs as int8, one per
  element), so it maps onto the model parameter's elements as Adam's moments do; the factors,
  identical on every rank of the group, are kept as they are.
- ``"fsdp1"``: per-element state is laid out like the optimizer tensor's local data (a flat
  shard, padding included, or an original parameter's 1-D view), the form FSDP1's
  ``optim_state_dict`` all-gathers and unflattens; the factors, identical on every rank, travel as
  one opaque ``bytes`` value (a JSON header and the raw data, byte-identical across ranks), the
  kind of value FSDP1 and its state-dict utilities pass through unchanged.

Expanded signs are 1 (M >= 0) or 0, int8 for DTensors and Megatron, float32 for FSDP1 (which flattens only
floating-point state); either way never the packed uint8 form, which is how they are told apart.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from dist_memopt.optim.bits import pack_signs, packed_numel, unpack_signs
from dist_memopt.shard.spec import local_tensor

__all__ = ["expand_state", "compact_state", "per_element_keys", "FACTORS_KEY"]

FACTORS_KEY = "factors"
PACKED_SIGN_DTYPE = torch.uint8
EXPANDED_SIGN_DTYPES = {"dtensor": torch.int8, "megatron": torch.int8, "fsdp1": torch.float32}


def _encode(tensors: dict[str, Tensor]) -> bytes:
    """Deterministic bytes (a JSON header, then raw data): equal on every rank for equal tensors."""
    header, payload = [], []
    for key in sorted(tensors):
        value = tensors[key].detach().to("cpu").contiguous().reshape(-1)
        header.append([key, str(value.dtype).removeprefix("torch."), value.numel()])
        payload.append(value.view(torch.uint8).numpy().tobytes())
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(payload)


def _decode(blob: bytes) -> dict[str, Tensor]:
    size = int.from_bytes(blob[:8], "little")
    position, tensors = 8 + size, {}
    for key, dtype_name, numel in json.loads(blob[8 : 8 + size]):
        dtype = getattr(torch, dtype_name)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        raw = bytearray(blob[position : position + nbytes])
        tensors[key] = torch.frombuffer(raw, dtype=dtype).clone() if nbytes else torch.empty(0, dtype=dtype)
        position += nbytes
    return tensors


#: per-element state kinds (see STATE_KINDS in dist_memopt.optim.base) and the segments they cover
_PER_ELEMENT = {"bits": "factored", "elems": "factored", "dense": "dense"}


def per_element_keys(state_kinds: dict[str, str]) -> dict[str, str]:
    """The state keys holding one entry per element (signs, moments), with their kinds."""
    return {key: kind for key, kind in state_kinds.items() if kind in _PER_ELEMENT}


def _segments(plan: Any, kind: str) -> list:
    return plan.factored if _PER_ELEMENT[kind] == "factored" else plan.dense_segments


def expand_state(plan: Any, param: Tensor, state: dict[str, Any], state_kinds: dict[str, str], style: str) -> dict[str, Any]:
    """Compact state -> the checkpoint form of ``style`` (a new dict; the input is not changed)."""
    state = dict(state)
    if style == "compact":
        return state
    if style not in EXPANDED_SIGN_DTYPES:
        raise ValueError(f"unknown checkpoint style {style!r}")
    local = local_tensor(param)
    per_element = per_element_keys(state_kinds)
    for key, kind in per_element.items():
        value = state.get(key)
        if value is None:
            continue
        dtype = EXPANDED_SIGN_DTYPES[style] if kind == "bits" else torch.float32
        out = torch.zeros(local.numel(), dtype=dtype, device=value.device)
        for seg in _segments(plan, kind):
            n = seg.segment.numel
            piece = (unpack_signs(seg.bits(value), n) > 0).to(dtype) if kind == "bits" else getattr(seg, kind)(value)
            out[seg.segment.offset : seg.segment.offset + n] = piece
        state[key] = out
    if style == "dtensor":
        from torch.distributed.tensor import DTensor

        for key in per_element:
            if key in state:
                state[key] = DTensor.from_local(
                    state[key].view(local.shape), param.device_mesh, param.placements, run_check=False,
                    shape=param.shape, stride=param.stride(),
                )
    elif style == "fsdp1":
        factor_keys = [k for k, v in state.items() if isinstance(v, Tensor) and k not in per_element and k != "step"]
        state[FACTORS_KEY] = _encode({k: state.pop(k) for k in factor_keys})
    return state


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
    factors = state.pop(FACTORS_KEY, None)
    if isinstance(factors, bytes):
        state.update(_decode(factors))
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
