"""What the fused CPU kernels share on the Python side: dtype codes, run tables, addresses, batches.

The kernels take int64 tables of addresses and sizes (one row per segment, one per run group) and
reach the tensors through them; the tensors stay referenced by the step's items while the kernels
run. A segment's runs are those the Triton kernels tile (:func:`~dist_memopt.shard.runs.runs_of`):
whole tensors, FSDP/ZeRO/Megatron ranges with partial first and last rows, tensor-parallel strided
runs, each segment of a stack.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import numpy as np

import torch
from torch import Tensor

from dist_memopt.shard.runs import runs_of

__all__ = ["DTYPE_CODES", "dtype_code", "address", "add_runs", "one_run", "whole_row_elements", "int64_table", "check_flat", "batched", "grad_offsets",
           "rebatched", "patch_grads"]

#: element types the kernels load and store themselves (the C++ side's ``Dtype``)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    """The C++ side's code of a parameter dtype (a ``KeyError`` for dtypes the kernels do not take)."""
    return DTYPE_CODES[dtype]


def address(t: Tensor, offset: int = 0) -> int:
    """Address of element ``offset`` of a contiguous tensor."""
    return t.data_ptr() + offset * t.element_size()


def add_runs(runs: list[int], index: int, geometry: Any) -> int:
    """Append segment ``index``'s run groups (segment, start, length, stride, count, k0) to
    ``runs``; returns the number of elements they hold."""
    rows, numel = _run_rows(geometry)
    for row in rows:
        runs.append(index)
        runs += row
    return numel


def one_run(geometry: Any) -> bool:
    """Whether the segment's elements are one run of consecutive positions of its (n, m) view (a
    whole tensor, or a range: FSDP's, ZeRO's, Megatron's), possibly cutting its first and last row."""
    rows, numel = _run_rows(geometry)
    return len(rows) == 1 and numel > 0 and rows[0][3] == 1


def whole_row_elements(geometry: Any) -> int:
    """Elements of the rows a segment of :func:`one_run` holds whole (the rest lie in the at most
    two rows its range cuts)."""
    (start, length, *_), = _run_rows(geometry)[0]
    m = geometry.cols
    first = -(-start // m)
    return max(0, (start + length) // m - first) * m


def _run_rows(geometry: Any) -> tuple[tuple[tuple[int, ...], ...], int]:
    """A geometry's run groups as (start, length, stride, count, k0) rows, and their elements;
    kept on the geometry (frozen dataclasses hold computed values in their ``__dict__``), which
    steps the same segment every step."""
    cached = geometry.__dict__.get("_cpu_run_rows")
    if cached is not None:
        return cached
    rows, k0 = [], 0
    for run in runs_of(geometry):
        rows.append((run.start, run.length, run.stride if run.count > 1 else 0, run.count, k0))
        k0 += run.numel
    cached = (tuple(rows), k0)
    geometry.__dict__["_cpu_run_rows"] = cached
    return cached


def int64_table(values: list[int], fields: int) -> Tensor:
    """A (rows, ``fields``) int64 CPU tensor of ``values``, row-major: what the kernels read."""
    return torch.tensor(values, dtype=torch.int64).view(-1, fields)


def check_flat(name: str, *tensors: Tensor) -> None:
    """The kernels walk raw addresses: every tensor they step must be contiguous."""
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"the fused CPU kernels step contiguous tensors; {name} has strides {t.stride()}")


def batched(jobs: list[Any]) -> dict[tuple, list[Any]]:
    """Jobs by (weight dtype, schedule), in first-seen order: one kernel call each."""
    batches: dict[tuple, list[Any]] = defaultdict(list)
    for job in jobs:
        batches[(job.item.weight.dtype, job.hp)].append(job)
    return batches


def grad_offsets(jobs: list[Any]) -> list[int]:
    """Each job's byte offset of its segment in its item's flat gradient (the gradient's address
    changes from step to step, the offset does not)."""
    return [job.seg.segment.offset * job.item.grad.element_size() for job in jobs]


def rebatched(prepared: list[tuple], schedule_of: dict[int, Any]) -> Optional[list[tuple]]:
    """Prepared batches ``(dtype, schedule, jobs, segs, runs, numel, offsets)`` with this step's
    schedules in place of the one each was built for, every job's ``hp`` set; None where a batch's
    jobs no longer share one schedule (the tables must be built again)."""
    out = []
    for dtype, _, jobs, segs, runs, numel, offsets in prepared:
        hp = schedule_of[id(jobs[0].item)]
        for job in jobs:
            mine = schedule_of[id(job.item)]
            if mine is not hp and mine != hp:
                return None
        out.append((dtype, hp, jobs, segs, runs, numel, offsets))
    for _, hp, jobs, *_ in out:
        for job in jobs:
            job.hp = hp
    return out


def patch_grads(segs: Tensor, jobs: list[Any], offsets: list[int], fields: tuple[int, ...]) -> None:
    """Write the jobs' gradient addresses (this step's tensors) into the table's ``fields``, on the
    host like the rest of the table (through numpy: no tensor op)."""
    addresses = np.fromiter((job.item.grad.data_ptr() + offset for job, offset in zip(jobs, offsets)), dtype=np.int64, count=len(jobs))
    table = segs.numpy()
    for field in fields:
        table[:, field] = addresses
