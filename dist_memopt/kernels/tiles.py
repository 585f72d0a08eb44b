"""What the fused kernels share: tiles of a segment's runs in its (n, m) view, pointer offsets.

A tile is ``TR`` consecutive view rows of one run group of the segment's window (a
:class:`~dist_memopt.shard.spec.Run`, cut by the same function the torch path uses), swept in
blocks of ``BC`` columns; :func:`tile_elements` tells, for each (row, column) of a block, whether
this segment holds that element and at which local index (the inverse of the run's positions).
Tensors of one dtype are addressed as a base pointer plus element offsets, so one launch reaches
every segment of a batch wherever its tensors live.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from dist_memopt.kernels import launch
from dist_memopt.shard.geometry import RangeGeometry
from dist_memopt.shard.runs import RunsGeometry, runs_of

__all__ = ["TILE_FIELDS", "CONTIGUOUS", "STRIDED", "DIVIDED", "tiles_shape", "tile_warps", "launched", "Offsets", "GradFields", "upload", "Batch", "reschedule", "tile_pieces",
           "index_math", "runs_cursor", "runs_advance", "tile_elements", "load_block", "store_block", "to_dtype_of"]

TILE_FIELDS = 6  # start, run length, stride, count, first local index of the piece, first row


def tiles_shape(m: int) -> tuple[int, int]:
    """(rows per tile, columns per block): 32 rows, blocks of 32 columns (16 for views of <= 16 columns).

    Compiled for sm_90 (``python -m tools.compile_kernels`` in a checkout), a block of 32 columns is 4
    elements per thread at :func:`tile_warps`: SMMF's tile takes about 98 registers, so an SM holds
    two programs (16 warps) whose column reductions and barriers overlap each other's loads, and
    Alada's kernels take at most 64, four programs. Blocks of 64 columns (8 elements per thread)
    need about 185 registers in the tile: one program of 8 warps per SM, each trip's loads waiting
    on the last trip's barrier, for about the same instructions per element. Capping registers
    (``maxnreg`` 64 or 80) spills the tile to its stack, as do 128-column blocks. Two block
    shapes, not one per power of two, keep the compiled variants few (each costs a GPU run half a
    second of compiling at its first step); masked lanes cost no memory traffic. The tile's rows,
    hence the partial sums it writes, do not depend on the column block.
    """
    return 32, 16 if m <= 16 else 32


def tile_warps(rows: int, columns: int) -> dict[str, int]:
    """Launch options of an element kernel: 4 elements per thread (8 warps for a 32 × 32 block)."""
    return {**launch.OPTIONS, "num_warps": max(1, min(8, rows * columns // 128))}


def launched(fn: Callable) -> Any:
    """``triton.jit`` for a kernel the step launches: one compiled variant per dtype and constexpr setting.

    Triton would also specialise on each integer argument's value (== 1, divisible by 16) and on
    each pointer's 16-byte alignment. The kernels reach elements through offsets loaded from their
    table, so that buys little, and it would compile new variants (about half a second each)
    whenever a shard's size or an allocation's address changes, mid-run and differently per rank.
    """
    names = [name for name, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation)]
    return triton.jit(fn, do_not_specialize=names, do_not_specialize_on_alignment=names)


class Offsets:
    """Element offsets of tensors relative to one base tensor of their dtype (pointer + offset)."""

    def __init__(self, base: Tensor) -> None:
        self.base = base

    def __call__(self, t: Optional[Tensor]) -> int:
        if t is None or t.numel() == 0:
            return 0  # an unused pointer (an empty tensor's data_ptr() is 0); offsets may be negative
        delta = t.data_ptr() - self.base.data_ptr()
        assert delta % t.element_size() == 0, "tensors of one dtype are element-aligned"
        return delta // t.element_size()


class BitOffsets:
    """Bit offsets of packed sign bytes, counted from the 4-byte word at or below ``base``'s first
    byte: the kernels load and xor aligned int32 words, and offsets of tensors at or above ``base``
    stay >= 0 (shifts, not signed division)."""

    def __init__(self, base: Tensor) -> None:
        self.shift = base.data_ptr() % 4  # base's first byte within its word
        self._word_at = base.data_ptr() - self.shift

    def __call__(self, t: Tensor) -> int:
        if t.numel() == 0:
            return 0  # an empty segment's bits: no tile reads them
        delta = t.data_ptr() - self._word_at
        assert delta >= 0, "sign tensors lie at or above the base"
        return delta * 8


class GradFields:
    """The places of a launch table that hold gradient offsets, so that a table kept from the
    previous step can take this step's gradients: after each backward they are new tensors, while
    everything else the table addresses (weights, state, statistic slots) stays where it was."""

    def __init__(self) -> None:
        self._places: list[int] = []  # positions in the table
        self._owners: list[int] = []  # the job (index in the runner's list) each place belongs to
        self._arrays: Optional[tuple[np.ndarray, np.ndarray]] = None  # both, once the table is built

    def add(self, place: int, job: int) -> None:
        """Position ``place`` of the table holds the gradient offset of job ``job`` (its segment's
        first element, from the base gradient)."""
        self._places.append(place)
        self._owners.append(job)

    def patch(self, table: Tensor, jobs: list[Any], base: Tensor) -> bool:
        """Write each job's gradient offset from ``base`` (this step's tensors) into ``table``, a
        CPU int64 tensor, through numpy (no tensor op); whether any changed (a GPU's allocator
        often hands the gradients the same places again: the device's copy of the table then serves)."""
        at = Offsets(base)
        offsets = np.fromiter((at(job.item.grad) + job.seg.segment.offset for job in jobs), dtype=np.int64, count=len(jobs))
        if self._arrays is None:
            self._arrays = (np.asarray(self._places, dtype=np.int64), np.asarray(self._owners, dtype=np.int64))
        places, owners = self._arrays
        values = offsets[owners]
        host = table.numpy()
        if np.array_equal(host[places], values):
            return False
        host[places] = values
        return True


def upload(table: Tensor, device: torch.device) -> Tensor:
    """The host's launch table on ``device``, without making the host wait for the device.

    ``table.to(device)`` would copy from pageable memory, which waits for every queued kernel
    (a host sync). The copy goes through a pinned copy of the table instead, asynchronously:
    torch's caching host allocator keeps that pinned memory until the copy is done, and
    :meth:`GradFields.patch` may change the host's table meanwhile. On CPU, the table itself.
    """
    if device.type == "cpu":
        return table
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


@dataclass
class Batch:
    """A runner's launches for segments of one (n, m) view, device and schedule (and dtypes)."""

    n: int
    m: int
    hp: Any  # the schedule its jobs share
    index: dict[str, int]  # index_math's constexpr
    tile_count: int
    seg_count: int
    numel: int
    jobs: list[Any]


def reschedule(batches: Iterable[Batch], schedule_of: dict[int, Any]) -> bool:
    """Give each kept batch, and its jobs, this step's schedule (``schedule_of``: by id of item);
    False, changing nothing, where a batch's jobs no longer share one (its launch would mix them)."""
    batches = list(batches)
    schedules = [[schedule_of[id(job.item)] for job in batch.jobs] for batch in batches]
    if any(hp is not mine[0] and hp != mine[0] for mine in schedules for hp in mine):
        return False
    for batch, mine in zip(batches, schedules):
        batch.hp = mine[0]
        for job in batch.jobs:
            job.hp = batch.hp
    return True


def holding(jobs: list[Any]) -> int:
    """The index of the first job whose weight has elements (else 0): a batch's base pointers are
    taken from its tensors, and an empty tensor has no address (``data_ptr()`` is 0)."""
    return next((i for i, j in enumerate(jobs) if j.item.weight.numel()), 0)


def tile_pieces(geometry: Union[RangeGeometry, RunsGeometry], rows_per_tile: int) -> Iterator[list[int]]:
    """The :data:`TILE_FIELDS` of every tile covering the geometry's window (none for an empty one).

    The one translation of a shard geometry into the kernels' int64 table. A single piece's stride
    is the view's size (a :class:`~dist_memopt.shard.spec.Run` of one piece has 0; the strided index
    math steps by the stride, and a batch of strided runs may hold single pieces: at least a column
    block, as index_math's choice assumes, and past every position, so only piece 0 is held).
    """
    m = geometry.cols
    k0 = 0
    for run in runs_of(geometry):
        stride = run.stride if run.count > 1 else geometry.rows * m
        for row0 in range(run.start // m, (run.last - 1) // m + 1, rows_per_tile):
            yield [run.start, run.length, stride, run.count, k0, row0]
        k0 += run.numel


#: ``RUNS`` values: one piece per run (FSDP, ZeRO, whole tensors); strided pieces found by a carry
#: from the last column block; strided pieces found by dividing each position
CONTIGUOUS, STRIDED, DIVIDED = 0, 1, 2
_INT32_SAFE = 2**30  # views up to this size: a piece's offsets, plus a run, stay within int32


def index_math(geometries: Iterable[Union[RangeGeometry, RunsGeometry]], columns: int) -> dict[str, int]:
    """The constexpr that picks a batch's index arithmetic in :func:`tile_elements` (blocks of
    ``columns``): :data:`CONTIGUOUS` when every run is one piece; :data:`STRIDED` when some run has
    several (a tensor-parallel or block-cut shard) and every such stride is at least a column block,
    so a position's piece is its row's piece or the next; :data:`DIVIDED` otherwise (strides below a
    block: tensors of a few columns), each position divided by the stride in 64 bits (a subroutine
    of about 80 instructions per element on a GPU)."""
    mode = CONTIGUOUS
    for geometry in geometries:
        for run in runs_of(geometry):
            if run.count > 1:
                small = run.stride < columns or geometry.rows * geometry.cols > _INT32_SAFE
                mode = DIVIDED if small else max(mode, STRIDED)
    return {"RUNS": mode}


@triton.jit
def runs_cursor(rows, m, start, stride, RUNS: tl.constexpr):
    """Per row, (piece, offset in its stride) of the row's first column: ``divmod(r·m − start, stride)``,
    floored (Triton's division truncates), both int32 (views of at most 2**30 elements). Used by
    :data:`STRIDED` only: one division per row, once."""
    if RUNS == 1:
        at = rows.to(tl.int64) * m - start
        piece = at // stride
        within = at - piece * stride
        below = within < 0
        return tl.where(below, piece - 1, piece).to(tl.int32), tl.where(below, within + stride, within).to(tl.int32)
    return tl.zeros(rows.shape, tl.int32), tl.zeros(rows.shape, tl.int32)


@triton.jit
def runs_advance(piece, within, stride, BC: tl.constexpr, RUNS: tl.constexpr):
    """The cursor ``BC`` columns on (the next column block): one carry at most, as ``BC <= stride``."""
    if RUNS == 1:
        within = within + BC
        carry = within >= stride.to(tl.int32)
        return piece + carry.to(tl.int32), tl.where(carry, within - stride.to(tl.int32), within)
    return piece, within


@triton.jit
def tile_elements(rows, row_ok, cols, col_ok, m, start, run, stride, count, k0, piece, within, RUNS: tl.constexpr):
    """(held, local index) of the (rows × cols) block: position p = r·m + c is held when it falls in
    a run, ``p = start + i·stride + j`` with ``i < count`` and ``j < run``; its index is ``k0 + i·run + j``.
    With :data:`CONTIGUOUS`, every run is one piece (``count`` 1): held when ``0 <= p - start < run``.
    With :data:`STRIDED`, ``piece``/``within`` is the row's cursor at the block's first column
    (:func:`runs_cursor`, :func:`runs_advance`): a column ``c`` of the block is at ``within + c`` in
    that piece or, past the stride, in the next one; 32-bit per element."""
    if RUNS == 2:
        rel = rows[:, None].to(tl.int64) * m + cols[None, :] - start
        whole = rel // stride
        offset = rel - whole * stride
        held = row_ok[:, None] & col_ok[None, :] & (rel >= 0) & (rel < (count - 1) * stride + run) & (offset < run)
        index = k0 + whole * run + offset
    elif RUNS == 1:
        at = within[:, None] + tl.arange(0, cols.shape[0])[None, :]  # < stride + BC <= 2·stride
        wrap = at >= stride.to(tl.int32)
        offset = tl.where(wrap, at - stride.to(tl.int32), at)
        whole = piece[:, None] + wrap.to(tl.int32)  # 0 <= whole < count as one unsigned compare
        in_run = (whole.to(tl.uint32, bitcast=True) < count.to(tl.uint32)) & (offset < run.to(tl.int32))
        held = row_ok[:, None] & col_ok[None, :] & in_run  # col_ok: a column past m is the next row's
        index = (k0 + piece.to(tl.int64) * run)[:, None] + (offset + tl.where(wrap, run.to(tl.int32), 0))
    else:  # per row, the held columns [first, last) and the index of column 0: 32-bit per element
        row_at = rows.to(tl.int64) * m - start
        first = tl.minimum(tl.maximum(-row_at, 0), m).to(tl.int32)
        last = tl.minimum(tl.maximum(run - row_at, 0), m).to(tl.int32)
        held = row_ok[:, None] & (cols[None, :] >= first[:, None]) & (cols[None, :] < last[:, None])
        index = (k0 + row_at)[:, None] + cols[None, :]
    return held, index


@triton.jit
def load_block(pointers, mask):
    """``tl.load`` of a (TR × BC) block of element pointers as the 1-D, row-major run of its elements
    (the block's own thread order), reshaped back. Strided index math leaves pointers contiguous
    along neither axis, which Triton 3.6 lays out column-major, converting every value between the
    two layouts through shared memory; 1-D there is one order, whatever the release."""
    size: tl.constexpr = pointers.shape[0] * pointers.shape[1]
    flat = tl.load(tl.reshape(pointers, [size]), mask=tl.reshape(mask, [size]), other=0)
    return tl.reshape(flat, [pointers.shape[0], pointers.shape[1]])


@triton.jit
def store_block(pointers, values, mask):
    """``tl.store`` of a (TR × BC) block as :func:`load_block` loads it."""
    size: tl.constexpr = pointers.shape[0] * pointers.shape[1]
    tl.store(tl.reshape(pointers, [size]), tl.reshape(values, [size]), mask=tl.reshape(mask, [size]))


@triton.jit
def to_dtype_of(x, P):
    """``x`` (fp32) rounded to nearest even in the element type of pointer ``P``, as torch's
    ``copy_`` rounds. bf16 by its bits (Triton's interpreter truncates a bf16 cast; on a GPU this
    is the hardware rounding); NaN stays NaN."""
    if P.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits >> 16).to(tl.uint16)
        rounded = tl.where(x == x, rounded, 0x7FC0)
        return rounded.to(tl.bfloat16, bitcast=True)
    return x.to(P.dtype.element_ty)
