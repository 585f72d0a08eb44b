"""DTensor parameters: FSDP2, HSDP, tensor parallelism and their 2-D / 3-D meshes.

A DTensor's local tensor holds, along each tensor dim, the global indices its placements give
this rank's mesh coordinate — ``Shard(d)`` a chunk, ``_StridedShard(d)`` (FSDP2 over a
tensor-parallel shard) a chunk of a chunk, ``Replicate()`` everything. The local tensor is the
product of those index sets: a box of the parameter for every layout FSDP2 and torch's
tensor-parallel styles produce (a ``RowwiseParallel`` weight is rows × a column block). Its
row-major flattening is a sequence of runs in the parameter's (see :class:`~dist_memopt.shard.spec.Run`),
and the statistics are completed over every mesh dimension that shards the parameter (one
flattened group for several), never over a replicate dimension. The index sets come from the placements' own offset arithmetic (the one
``compute_local_shape_and_global_offset`` uses), kept whole so that strided sets are exact too.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from dist_memopt.optim.checkpoint import CheckpointStyle, register_checkpoint_style
from dist_memopt.shard.spec import ParamLayout, Run, Segment, ShardSpec, register_layout_resolver

__all__ = ["dtensor_layout", "local_indices", "box_runs"]

#: what ``_StridedShard._local_shard_size_and_offset`` needs to return every offset
try:  # torch 2.13 asks which offsets by a mode; 2.11 by a flag, ``return_first_offset=False``
    from torch.distributed.tensor.placement_types import _StridedShardOffsetMode

    _ALL_OFFSETS: object = _StridedShardOffsetMode.ALL
except ImportError:
    _ALL_OFFSETS = False


def _describe(param: DTensor) -> str:
    return f"DTensor of shape {tuple(param.shape)} with placements {tuple(param.placements)} on {param.device_mesh}"


def _check_placements(param: DTensor) -> None:
    for placement in param.placements:
        if placement.is_partial():
            raise ValueError(
                f"{_describe(param)}: a Partial parameter holds unreduced summands, not the parameter's "
                "values, so no optimizer can step it; make it Replicate() or Shard()"
            )
        if not isinstance(placement, (Shard, _StridedShard, Replicate)):
            raise ValueError(
                f"{_describe(param)}: dist_memopt understands Shard, _StridedShard and Replicate "
                f"placements, not {type(placement).__name__}"
            )


def local_indices(shape: Sequence[int], coordinate: Sequence[int], mesh_shape: Sequence[int],
                  placements: Sequence[Placement]) -> list[Tensor]:
    """Per tensor dim, the global indices this mesh coordinate holds, in local order.

    Placements apply left to right, each splitting what the previous ones left (``_StridedShard``
    encodes FSDP2's right-to-left sharding in this order), as in torch's own offset computation.
    """
    ndim = len(shape)
    held: list[Optional[Tensor]] = [None] * ndim
    sizes = [int(d) for d in shape]
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, (Shard, _StridedShard)):
            continue
        dim = placement.dim % ndim
        chunks, rank = int(mesh_shape[mesh_dim]), int(coordinate[mesh_dim])
        if isinstance(placement, _StridedShard):
            size, offsets = placement._local_shard_size_and_offset(sizes[dim], chunks, rank, _ALL_OFFSETS)
            local = torch.tensor(list(offsets or [])[:size], dtype=torch.long)
        else:
            size, offset = placement._local_shard_size_and_offset(sizes[dim], chunks, rank)
            local = torch.arange(int(offset), int(offset) + int(size))
        previous = held[dim]
        held[dim] = local if previous is None else previous[local]
        sizes[dim] = int(size)
    return [torch.arange(int(shape[d])) if held[d] is None else held[d] for d in range(ndim)]


def _ranges(index: Tensor) -> list[tuple[int, int]]:
    """Maximal (first, length) ranges of consecutive values in ``index``, in order."""
    values = index.tolist()
    ranges: list[tuple[int, int]] = []
    for v in values:
        if ranges and ranges[-1][0] + ranges[-1][1] == v:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((v, 1))
    return ranges


def box_runs(shape: Sequence[int], indices: Sequence[Tensor]) -> list[Run]:
    """The runs of the product of per-dim index sets, in the row-major order of the local tensor."""
    shape = [int(d) for d in shape]
    if not shape:
        return [Run(0, 1)]
    if any(index.numel() == 0 for index in indices):
        return []
    partial = [d for d in range(len(shape)) if not torch.equal(indices[d], torch.arange(shape[d]))]
    if not partial:
        return [Run(0, math.prod(shape))]
    k = partial[-1]  # dims after k are whole: each index of dims <= k is one contiguous stretch
    inner = math.prod(shape[k + 1 :])
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    bases = torch.zeros((), dtype=torch.long)
    for d in range(k):  # every combination of the outer dims' indices, in row-major order
        bases = (bases.unsqueeze(-1) + indices[d] * strides[d]).reshape(-1)
    runs = []
    spans = _ranges(indices[k])
    for base in bases.reshape(-1).tolist():
        for first, length in spans:
            runs.append(Run(base + first * inner, length * inner))
    return runs


def reduction_group(mesh: DeviceMesh, dims: Sequence[int]) -> ProcessGroup | tuple[ProcessGroup, ...]:
    """The group over which a parameter sharded on mesh dimensions ``dims`` is completed.

    One dimension: its group. Several (dp × tp): the mesh's flattened group of those dimensions,
    as torchtitan flattens its meshes (created once, on every rank alike, cached by the mesh), so
    one all_reduce completes the statistics and SMMF's stays in flight until the next step; a
    mesh without dimension names gets a chain of the dimensions' groups (summed in turn).
    """
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    names = mesh.mesh_dim_names
    if names is None or not hasattr(mesh, "_flatten"):
        return tuple(mesh.get_group(d) for d in dims)
    return mesh[tuple(names[d] for d in dims)]._flatten().get_group()


# Layouts by parameter, kept while its placements, mesh and shapes stay: deriving one walks the
# runs in Python (once per row of a column-sharded embedding), and state_dict() asks again.
_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def dtensor_layout(param: Tensor) -> Optional[ParamLayout]:
    """The layout of a DTensor parameter (None for anything else)."""
    if not isinstance(param, DTensor):
        return None
    key = (tuple(param.placements), id(param.device_mesh), tuple(param.shape), tuple(param._local_tensor.shape))
    cached = _LAYOUTS.get(param)
    if cached is not None and cached[0] == key:
        return cached[1]
    layout = _derive_layout(param)
    _LAYOUTS[param] = (key, layout)
    return layout


def _derive_layout(param: DTensor) -> ParamLayout:
    _check_placements(param)
    mesh, placements, shape = param.device_mesh, param.placements, param.shape
    sharding = [d for d, p in enumerate(placements) if isinstance(p, (Shard, _StridedShard)) and mesh.size(d) > 1]
    if not sharding:
        return ParamLayout((Segment(0, ShardSpec.full(shape)),), checkpoint="dtensor")
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"{_describe(param)}: this rank is not part of the parameter's device mesh")
    indices = local_indices(shape, coordinate, mesh.shape, placements)
    local_shape = tuple(index.numel() for index in indices)
    if local_shape != tuple(param._local_tensor.shape):
        raise ValueError(
            f"{_describe(param)}: its local tensor has shape {tuple(param._local_tensor.shape)} but its "
            f"placements give {local_shape}; dist_memopt cannot tell where its elements lie"
        )
    signature = f"{tuple(placements)} on mesh {tuple(mesh.shape)}"
    spec = ShardSpec.of_runs(shape, box_runs(shape, indices), reduction_group(mesh, sharding), signature)
    return ParamLayout((Segment(0, spec),), checkpoint="dtensor")


register_layout_resolver(dtensor_layout)


def _as_dtensors(param: Tensor, state: dict[str, Any], per_element: dict[str, str]) -> dict[str, Any]:
    """FSDP2 / TP checkpoints: per-element state as DTensors shaped and placed like the parameter,
    so torch.distributed.checkpoint saves it sharded and reshards it on load; the factors
    (global-size, identical on every holder) stay plain tensors."""
    local = param._local_tensor
    for key in per_element:
        if key in state:
            state[key] = DTensor.from_local(
                state[key].view(local.shape), param.device_mesh, param.placements, run_check=False,
                shape=param.shape, stride=param.stride(),
            )
    return state


register_checkpoint_style(CheckpointStyle("dtensor", torch.int8, finish=_as_dtensors))
