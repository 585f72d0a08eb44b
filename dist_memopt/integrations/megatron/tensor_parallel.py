"""Where each tensor-parallel rank's piece of a Megatron parameter lies in the TP=1 parameter.

SMMF and Alada factor the *whole* parameter, so a TP rank's piece must be described in the
coordinates of the TP=1 tensor. Megatron's distributed checkpointing already says exactly that for
every parameter: its ``sharded_state_dict`` gives each local tensor's global (TP=1) shape and offset,
and splits fused weights whose piece is not one block — the gated MLP's ``linear_fc1``, whose rank
holds a gate block and an up block, is a ``ShardedTensorFactory`` building two ShardedTensors. A
piece is therefore a list of *boxes* of the global tensor, in local order; its elements are the
runs of those boxes (:func:`~dist_memopt.integrations.dtensor.box_runs`).

The parameters' own tensor-parallel attributes (``tensor_model_parallel``, ``partition_dim``,
``partition_stride``) say the same thing by Megatron's initialization rule (dim ``partition_dim``
cut into ``stride × tp`` chunks, rank r holding chunks r, r + tp, ...); each piece is checked
against them, so a module whose checkpoint metadata and weights disagree is an error, not a
silently wrong factorization. Stacking axes that Megatron prepends (the layer index) are dropped.

MoE experts (``SequentialMLP``: each local expert an MLP of its own) are split over the *expert*
tensor-parallel group, not the dense one: their pieces are checked against that group's rank and
size and marked ``expert``, so that their statistics are completed over it. Megatron's checkpoint
metadata gives each expert its global index as a prepended (stacking) axis, so every expert, on
whichever expert-parallel rank, is a parameter of its own: nothing is reduced across experts.
Grouped-GEMM experts (``GroupedMLP``, ``TEGroupedMLP``) hold all local experts in one fused weight
that the metadata describes expert by expert; they are refused (see
:func:`refuse_grouped_experts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from dist_memopt.integrations.dtensor import box_runs
from dist_memopt.shard.spec import Run, ShardSpec, cut_runs

__all__ = [
    "Box", "TPPiece", "tp_pieces", "piece_spec", "piece_from_sharded_tensors", "attribute_boxes",
    "expert_parameter_ids", "refuse_grouped_experts",
]


@dataclass(frozen=True)
class Box:
    """Elements ``offset[d] .. offset[d] + shape[d] - 1`` along each dim of the global tensor."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TPPiece:
    """A parameter's local tensor as boxes of its TP=1 tensor (``global_shape``), in local order."""

    global_shape: torch.Size
    boxes: tuple[Box, ...]
    expert: bool = False  # an MoE expert's: split over the expert tensor-parallel group

    @property
    def is_split(self) -> bool:
        """Whether the piece is less than the whole parameter (it is tensor-parallel)."""
        return sum(box.numel for box in self.boxes) < math.prod(self.global_shape)

    def runs(self) -> list[Run]:
        """The piece's global flat positions, as runs in local order."""
        runs: list[Run] = []
        for box in self.boxes:
            indices = [torch.arange(o, o + s) for o, s in zip(box.offset, box.shape)]
            runs += box_runs(self.global_shape, indices)
        return runs


def piece_from_sharded_tensors(param: Tensor, sharded: list[Any], name: str) -> TPPiece:
    """The piece ``param`` is, from the ShardedTensors Megatron's checkpointing makes of it."""
    k = sharded[0].prepend_axis_num
    global_shape = torch.Size(sharded[0].global_shape[k:])
    itemsize = param.element_size()
    located = []
    for sh in sharded:
        if tuple(sh.global_shape[sh.prepend_axis_num :]) != tuple(global_shape):
            raise ValueError(f"parameter {name!r}: its checkpoint pieces disagree on the global shape")
        local_start = (sh.data.data_ptr() - param.data_ptr()) // itemsize
        offset = tuple(int(o) for o in sh.global_offset[sh.prepend_axis_num :])
        located.append((local_start, Box(offset, tuple(int(s) for s in sh.data.shape))))
    located.sort(key=lambda item: item[0])
    position = 0
    for local_start, box in located:
        if local_start != position:
            raise ValueError(f"parameter {name!r}: its checkpoint pieces are not consecutive parts of its local tensor")
        position += box.numel
    if position != param.numel():
        raise ValueError(f"parameter {name!r}: its checkpoint pieces hold {position} of its {param.numel()} elements")
    return TPPiece(global_shape, tuple(box for _, box in located))


def attribute_boxes(param: Tensor, global_shape: torch.Size, tp_rank: int, tp_size: int) -> tuple[Box, ...]:
    """The boxes Megatron's initialization rule gives from the parameter's TP attributes."""
    shape = tuple(int(s) for s in global_shape)
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return (Box((0,) * len(shape), shape),)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunk = shape[dim] // (stride * tp_size)
    boxes = []
    for i in range(stride):
        offset = [0] * len(shape)
        offset[dim] = (tp_rank + i * tp_size) * chunk
        box_shape = list(shape)
        box_shape[dim] = chunk
        boxes.append(Box(tuple(offset), tuple(box_shape)))
    return tuple(boxes)


def _same_elements(a: tuple[Box, ...], b: tuple[Box, ...], shape: torch.Size) -> bool:
    return ShardSpec.of_runs(shape, TPPiece(shape, a).runs()) == ShardSpec.of_runs(shape, TPPiece(shape, b).runs())


def _unwrapped(chunk: Any) -> Any:
    """The Megatron module inside DDP / Float16Module wrappers (they have no checkpoint metadata)."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (_BaseDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def expert_parameter_ids(module: Any) -> set[int]:
    """id() of every parameter of an MoE expert layer in ``module`` (Megatron's ``is_expert``
    linear layers: split over the expert tensor-parallel group)."""
    return {id(p) for m in module.modules() if getattr(m, "is_expert", False) for p in m.parameters(recurse=False)}


def refuse_grouped_experts(model_chunks: Iterable[Any]) -> None:
    """ValueError if a model has grouped-GEMM experts, whose fused weight's pieces are not described."""
    from megatron.core.transformer.moe.experts import GroupedMLP, TEGroupedMLP

    for chunk in map(_unwrapped, model_chunks):
        for name, module in chunk.named_modules():
            if isinstance(module, (GroupedMLP, TEGroupedMLP)):
                raise ValueError(
                    f"{name or 'the model'} is a {type(module).__name__}: grouped-GEMM experts hold all local experts in "
                    "one fused weight, which Megatron's checkpoint metadata describes expert by expert; with tensor or "
                    "expert tensor parallelism SMMF/Alada need each piece's place, so use SequentialMLP experts "
                    "(moe_grouped_gemm=False)"
                )


def piece_spec(shape: torch.Size, piece: Optional[TPPiece], window: Optional[tuple[int, int]],
               tp_group: Any, dp_group: Any, expert_tp_group: Any = None) -> ShardSpec:
    """The shard description of a tensor the optimizer steps: the parameter's TP piece (or all of
    it), cut to ``window`` of its local elements (the distributed optimizer's range, or None), its
    statistics completed over the tensor-parallel group (``expert_tp_group`` for an expert's piece)
    if it is split and the data-parallel group if it is cut; groups of one rank are left out
    (nothing to complete)."""
    split = piece is not None and piece.is_split
    if split and piece.expert:
        tp_group = expert_tp_group
    global_shape = piece.global_shape if split else torch.Size(shape)
    numel = math.prod(shape)
    runs = piece.runs() if split else ([Run(0, numel)] if numel else [])
    if window is not None:
        runs = cut_runs(runs, *window)
    groups = tuple(g for g in (tp_group if split else None, dp_group) if g is not None and g.size() > 1)
    signature = f"megatron tensor parallel: {len(piece.boxes)} boxes of {tuple(global_shape)}" if split else ""
    return ShardSpec.of_runs(global_shape, runs, groups if len(groups) > 1 else (groups[0] if groups else None), signature)


def tp_pieces(model_chunks: Iterable[Any], tp_rank: int, tp_size: int,
              expert_tp_rank: Optional[int] = None, expert_tp_size: Optional[int] = None) -> dict[int, TPPiece]:
    """id(parameter) -> its piece, for every parameter of ``model_chunks`` (Megatron modules);
    experts' pieces are checked against the expert tensor-parallel rank and size (default: the
    tensor-parallel ones)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    model_chunks = list(model_chunks)
    refuse_grouped_experts(model_chunks)
    expert_rank = tp_rank if expert_tp_rank is None else expert_tp_rank
    expert_size = tp_size if expert_tp_size is None else expert_tp_size
    pieces: dict[int, TPPiece] = {}
    for chunk in map(_unwrapped, model_chunks):
        names = {id(p): n for n, p in chunk.named_parameters()}
        experts = expert_parameter_ids(chunk)
        sharded, _ = extract_sharded_tensors_and_factories(chunk.sharded_state_dict())
        for sh in nested_values(sharded):
            param_id = id(sh.data)
            if param_id not in names:
                continue
            built = list(nested_values(sh.build())) if isinstance(sh, ShardedTensorFactory) else [sh]
            param = sh.data
            piece = piece_from_sharded_tensors(param, built, names[param_id])
            if param_id in experts:
                piece = TPPiece(piece.global_shape, piece.boxes, expert=True)
                expected = attribute_boxes(param, piece.global_shape, expert_rank, expert_size)
            else:
                expected = attribute_boxes(param, piece.global_shape, tp_rank, tp_size)
            if not _same_elements(piece.boxes, expected, piece.global_shape):
                raise ValueError(
                    f"parameter {names[param_id]!r}: Megatron's checkpoint metadata places it at {piece.boxes} of "
                    f"{tuple(piece.global_shape)}, its tensor-parallel attributes (partition_dim "
                    f"{getattr(param, 'partition_dim', None)}, partition_stride {getattr(param, 'partition_stride', None)}) "
                    f"at {expected}; dist_memopt cannot tell where its elements lie"
                )
            pieces[param_id] = piece
        missing = [n for n, p in chunk.named_parameters() if id(p) not in pieces and p.requires_grad]
        if missing:
            raise ValueError(
                f"parameters {missing} are not in the model's sharded_state_dict, so their place in the "
                "TP=1 parameter is unknown (SMMF/Alada with tensor_model_parallel_size > 1 need it)"
            )
    return pieces
