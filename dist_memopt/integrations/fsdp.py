"""FSDP2 (and any DTensor parameter): where each rank's shard lies, and over which group.

FSDP2's ``fully_shard`` turns parameters into DTensors placed ``Shard(0)`` on its mesh (HSDP:
``(Replicate(), Shard(0))``). A ``Shard(0)`` block of rows is one contiguous range of the
parameter's row-major flattening, so each parameter is a single segment; its statistics are reduced
over the mesh dimension that shards it, never over a replicate dimension.
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dist_memopt.shard.spec import ParamLayout, Segment, ShardSpec, register_layout_resolver

__all__ = ["dtensor_layout"]


def dtensor_layout(param: Tensor) -> Optional[ParamLayout]:
    """The layout of a DTensor parameter (None for anything else)."""
    if not isinstance(param, DTensor):
        return None
    shape = param.shape
    placements = param.placements
    if any(p.is_partial() for p in placements):
        raise ValueError(f"parameter DTensor with placements {placements}: Partial parameters cannot be optimized")
    sharded = [(mesh_dim, p) for mesh_dim, p in enumerate(placements) if p.is_shard()]
    if not sharded:
        return ParamLayout((Segment(0, ShardSpec.full(shape)),))
    if len(sharded) > 1 or type(sharded[0][1]).__name__ != "Shard" or sharded[0][1].dim != 0:
        raise ValueError(
            f"parameter DTensor with placements {tuple(placements)} is not supported: dist_memopt "
            "handles one Shard(0) mesh dimension (FSDP2, HSDP); tensor-parallel shards along other "
            "dims are not contiguous ranges of the parameter"
        )
    mesh_dim = sharded[0][0]
    local_shape, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, placements)
    row_numel = math.prod(shape[1:])
    start = offset[0] * row_numel if len(shape) else 0
    numel = math.prod(local_shape)
    group = param.device_mesh.get_group(mesh_dim)
    return ParamLayout((Segment(0, ShardSpec(shape, start, start + numel, group)),))


register_layout_resolver(dtensor_layout)
