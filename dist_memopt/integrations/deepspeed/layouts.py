"""Where each model parameter's fragment lies in the tensors DeepSpeed hands to the optimizer.

* ZeRO 1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``: each param group becomes one flat
  fp32 partition per rank. DeepSpeed records, for every model parameter overlapping it,
  ``param._hp_mapping``: ``lp_fragment_address`` is the range inside the flattened parameter and
  ``hp_fragment_address`` the position inside the partition. Alignment padding belongs to no
  parameter, so no segment covers it.
* ZeRO 3 (``DeepSpeedZeroOptimizer_Stage3``): each parameter is split alone; rank ``r`` holds
  ``[r*ps, (r+1)*ps)`` of it (``ps = param.partition_numel()``, the tail zero-padded), and the fp32
  copy of a *sub-group* of parameters is one flat tensor, the parameters' partitions side by side.
* Stage 0 (plain data parallelism, also under DeepSpeed's fp16/bf16 wrappers): every rank holds
  whole parameters with identical reduced gradients, which is the default layout; nothing to do.

Every rank lists every parameter of a partition's group in the same order, with an empty range
for parameters it does not hold: the optimizer's one all_reduce per group then has the same
layout on every rank. The group is the partition's data-parallel group (MoE expert groups their
own, as DeepSpeed's ``real_dp_process_group`` says). No optimizer math lives here.

Layouts are declared with :func:`dist_memopt.shard.set_layout`, whose table is weak and keyed by
identity (DeepSpeed saves its fp32 partitions with ``torch.save``, which would pickle a tensor
attribute, and a process group cannot be pickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from dist_memopt.shard.spec import Segment, ShardSpec, set_layout

__all__ = ["PartitionLayout", "describe_partitions"]


@dataclass(frozen=True)
class PartitionLayout:
    """One optimizer tensor DeepSpeed steps, with the model parameters its segments belong to.

    ``params[k]`` is the model parameter of the layout's k-th segment (zero-size parameters have
    no segment). ``group_index`` is the optimizer param group the tensor is stepped in.
    """

    tensor: Tensor
    params: tuple[Tensor, ...]
    segments: tuple[Segment, ...]
    group_index: int


def describe_partitions(wrapper: Any, names: dict[Tensor, str]) -> list[PartitionLayout]:
    """Declare the layout of every tensor ``wrapper`` will put in the optimizer's param_groups.

    ``wrapper`` is what ``deepspeed.initialize`` made of the client optimizer; ``names`` maps
    model parameters to their names (``engine.param_names``). Returns the layouts declared (empty
    for stage 0, whose tensors are whole parameters).
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    kind = type(wrapper)
    if kind is DeepSpeedZeroOptimizer:
        layouts = _zero12_layouts(wrapper, names)
    elif kind is BF16_Optimizer:
        layouts = _bf16_layouts(wrapper, names)
    elif kind is DeepSpeedZeroOptimizer_Stage3:
        layouts = _zero3_layouts(wrapper, names)
    elif isinstance(wrapper, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        raise NotImplementedError(
            f"dist_memopt does not support DeepSpeed's {kind.__name__} (ZenFlow / SuperOffload) yet; "
            "use plain ZeRO stage 1, 2 or 3"
        )
    else:
        return []  # stage 0: whole parameters, replicas after DeepSpeed's gradient all-reduce
    for layout in layouts:
        set_layout(layout.tensor, layout.segments)  # checks the segments fit the partition
    return layouts


def _fragment_segments(
    flat_order: Sequence[Tensor],
    shapes: Sequence[Any],
    partition: Tensor,
    group: dist.ProcessGroup,
    names: dict[Tensor, str],
    flat_offsets: Optional[Sequence[int]] = None,
    partition_start: int = 0,
) -> tuple[tuple[Tensor, ...], tuple[Segment, ...]]:
    """Segments of a ZeRO 1/2 or BF16 flat partition, from each parameter's ``_hp_mapping``.

    ``flat_order`` lists the group's parameters in the order they were flattened (identical on
    every rank). ``flat_offsets`` (where each starts in the flat buffer) lets us check that
    DeepSpeed's mapping agrees with the buffer it describes.
    """
    params, segments, wrong = [], [], []
    position = 0
    for index, (param, shape) in enumerate(zip(flat_order, shapes)):
        numel = shape.numel()
        if numel == 0:
            continue
        name = names.get(param, "")
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            spec = ShardSpec(shape, 0, 0, group)  # held by other ranks: still in the reduction
            segments.append(Segment(position, spec, name))
        else:
            start, count = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            offset = mapping.hp_fragment_address.start
            hp = mapping.hp_fragment
            view_offset = (hp.data_ptr() - partition.data_ptr()) // partition.element_size()
            misplaced = hp.untyped_storage().data_ptr() != partition.untyped_storage().data_ptr() or view_offset != offset
            if flat_offsets is not None:
                misplaced |= flat_offsets[index] + start != partition_start + offset
            if misplaced:
                wrong.append(name or str(index))
            segments.append(Segment(offset, ShardSpec(shape, start, start + count, group), name))
            position = offset + count
        params.append(param)
    _agree_on_mapping(wrong, group)
    return tuple(params), tuple(segments)


def _agree_on_mapping(wrong: list[str], group: dist.ProcessGroup) -> None:
    """Raise on every rank of ``group`` if DeepSpeed's mapping is wrong on any (no rank hangs)."""
    from deepspeed.accelerator import get_accelerator

    flag = torch.tensor([float(bool(wrong))], device=get_accelerator().current_device_name())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item():
        where = f"parameters {wrong}" if wrong else "parameters held by other ranks"
        raise RuntimeError(
            f"DeepSpeed's _hp_mapping of {where} does not match the flat fp32 partition it describes, so "
            "their optimizer state would be laid out wrongly. DeepSpeed 0.19.8 does this with "
            "zero_optimization.round_robin_gradients=true; turn it off."
        )


def _zero12_layouts(zero: Any, names: dict[Tensor, str]) -> list[PartitionLayout]:
    if zero.elastic_checkpoint:
        raise NotImplementedError(
            "zero_optimization.elastic_checkpoint=true cuts every optimizer-state tensor by the "
            "partition's padding, which assumes Adam's per-element state and would corrupt SMMF/Alada "
            "factors; leave it off and use universal checkpoints (dist_memopt.integrations.deepspeed.universal)"
        )
    layouts = []
    for i, partition in enumerate(zero.single_partition_of_fp32_groups):
        group = zero.real_dp_process_group[i]
        partition_size = zero.partition_size[i]
        start = dist.get_rank(group=group) * partition_size
        shapes = [meta.shape for meta in zero.round_robin_bit16_meta[i]]
        params, segments = _fragment_segments(
            zero.round_robin_bit16_groups[i], shapes, partition, group, names, zero.round_robin_bit16_offsets[i], start
        )
        layouts.append(PartitionLayout(partition, params, segments, i))
    return layouts


def _bf16_layouts(bf16: Any, names: dict[Tensor, str]) -> list[PartitionLayout]:
    layouts = []
    for i, partition in enumerate(bf16.fp32_groups_flat_partition):
        group = bf16.real_dp_process_group[i]
        lp_params = bf16.bf16_groups[i]
        offsets, position = [], 0
        for p in lp_params:  # BF16_Optimizer flattens its params back to back, padding at the end
            offsets.append(position)
            position += p.numel()
        start = dist.get_rank(group=group) * partition.numel()
        params, segments = _fragment_segments(
            lp_params, [p.shape for p in lp_params], partition, group, names, offsets, start
        )
        layouts.append(PartitionLayout(partition, params, segments, i))
    return layouts


def _zero3_layouts(zero: Any, names: dict[Tensor, str]) -> list[PartitionLayout]:
    if zero.swap_optimizer:
        raise NotImplementedError(
            "dist_memopt does not support ZeRO-3 NVMe optimizer offload (its fp32 partitions are "
            "swapped out of memory between steps); offload to cpu instead"
        )
    layouts = []
    for i, sub_group in enumerate(zero.fp16_groups):
        flat = zero.fp32_partitioned_groups_flat[i]
        group = zero.sub_group_process_groups[i]
        rank = dist.get_rank(group=group)
        params, segments = [], []
        offset = 0
        for param in sub_group:
            per_rank = param.partition_numel()
            numel = param.ds_numel
            if numel:
                start = min(rank * per_rank, numel)
                end = min(start + per_rank, numel)  # the tail beyond numel is zero padding
                segments.append(Segment(offset, ShardSpec(param.ds_shape, start, end, group), names.get(param, "")))
                params.append(param)
            offset += per_rank
        if offset != flat.numel():
            raise RuntimeError(
                f"ZeRO-3 sub-group {i} holds {flat.numel()} fp32 elements but its parameters' "
                f"partitions add up to {offset}: DeepSpeed's layout is not the one this adapter knows"
            )
        layouts.append(PartitionLayout(flat, tuple(params), tuple(segments), zero.sub_group_to_group_id[i]))
    return layouts
