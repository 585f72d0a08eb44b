"""FSDP1: where each rank's shard of a flat parameter lies, over which group.

(FSDP2's DTensor parameters, alone or with tensor parallelism, are described by
:mod:`dist_memopt.integrations.dtensor`.)

FSDP1 flattens the parameters of each wrapped module into one ``FlatParameter`` and gives each rank
a contiguous slice of it. With ``use_orig_params=False`` the optimizer sees that slice: one segment
per original parameter, empty where the parameter lies on other ranks, alignment padding excluded.
With ``use_orig_params=True`` it sees each original parameter as a 1-D view of its piece (shape
``(0,)`` when it lies elsewhere). Either way the global shapes and ranges come from the flat
parameter's ``_shard_param_infos`` and the group from its ``FlatParamHandle``, which the
parameters do not reference; the live handles are found once, by a scan of the garbage
collector's objects, the first time an FSDP1 parameter reaches an optimizer.
"""

from __future__ import annotations

import gc
import json
from typing import Any, Optional

import torch
from torch import Tensor

from dist_memopt.optim.checkpoint import CheckpointStyle, register_checkpoint_style

from dist_memopt.shard.spec import (
    ParamLayout,
    Segment,
    ShardSpec,
    declare_layout,
    declared_layout,
    register_layout_resolver,
)

__all__ = ["fsdp1_layout", "FACTORS_KEY"]


_FLATTENED_ATTR = "_fsdp_flattened"  # FSDP1 marks original parameters it has flattened


def _is_fsdp1_parameter(param: Tensor) -> bool:
    return getattr(param, _FLATTENED_ATTR, False) or type(param).__name__ == "FlatParameter"


def _index_fsdp1_handles() -> None:
    """Describe every FSDP1 flat parameter and original parameter view alive in this process."""
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    for handle in (o for o in gc.get_objects() if type(o) is FlatParamHandle):
        flat = handle.flat_param
        if declared_layout(flat) is not None:
            continue
        # NO_SHARD keeps whole parameters whose gradients are all-reduced: exact replicas
        group = handle.process_group if handle.uses_sharded_strategy else None
        pieces = []
        for shape, info in zip(flat._shapes, flat._shard_param_infos):
            if info.in_shard:
                end = info.intra_param_end_idx + 1  # FSDP's end index is inclusive
                pieces.append((info.offset_in_shard, ShardSpec(shape, info.intra_param_start_idx, end, group)))
            else:
                pieces.append((None, ShardSpec(shape, 0, 0, group)))
        # the flat parameter: one segment per original parameter (empty ones where they sit)
        segments, position = [], 0
        for name, (offset, spec) in zip(flat._fqns, pieces):
            offset = position if offset is None else offset
            segments.append(Segment(offset, spec, name))
            position = offset + spec.numel
        declare_layout(flat, ParamLayout(tuple(segments), checkpoint="fsdp1"))
        # use_orig_params=True: each original parameter is its own piece
        for original, name, (_, spec) in zip(flat._params or (), flat._fqns, pieces):
            declare_layout(original, ParamLayout((Segment(0, spec, name),), checkpoint="fsdp1"))


def fsdp1_layout(param: Tensor) -> Optional[ParamLayout]:
    """The layout of an FSDP1 FlatParameter or flattened original parameter (None otherwise)."""
    if not _is_fsdp1_parameter(param):
        return None
    _index_fsdp1_handles()  # only reached by FSDP1 parameters not declared yet
    layout = declared_layout(param)
    if layout is None:
        raise ValueError(
            "an FSDP1-flattened parameter without a live FlatParamHandle reached the optimizer: "
            "build the optimizer after wrapping the model with FullyShardedDataParallel"
        )
    return layout


register_layout_resolver(fsdp1_layout)


# --- FSDP1's checkpoint form ------------------------------------------------------------------
# Per-element state laid out like the optimizer tensor's local data (a flat shard, padding
# included, or an original parameter's 1-D view): the form FSDP1's optim_state_dict all-gathers and
# unflattens (floating point only, so signs are float32). The factors, identical on every rank,
# travel as one opaque bytes value (a JSON header and the raw data, byte-identical across ranks),
# the kind of value FSDP1 and its state-dict utilities pass through unchanged.

FACTORS_KEY = "factors"


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


def _pack_factors(param: Tensor, state: dict[str, Any], per_element: dict[str, str]) -> dict[str, Any]:
    factor_keys = [k for k, v in state.items() if isinstance(v, Tensor) and k not in per_element and k != "step"]
    state[FACTORS_KEY] = _encode({k: state.pop(k) for k in factor_keys})
    return state


def _unpack_factors(state: dict[str, Any]) -> dict[str, Any]:
    factors = state.get(FACTORS_KEY)
    if isinstance(factors, bytes):
        state = {k: v for k, v in state.items() if k != FACTORS_KEY}
        state.update(_decode(factors))
    return state


register_checkpoint_style(CheckpointStyle("fsdp1", torch.float32, finish=_pack_factors, restore=_unpack_factors))
