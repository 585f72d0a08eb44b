"""SMMF's step as fused Triton kernels: one pass over the elements per batch of segments.

The same equations as :func:`dist_memopt.optim.smmf._factored_step`, a second implementation
tested against it and against the float64 reference. Per batch of segments sharing an (n, m)
view and a schedule, three launches in all:

1. ``_tile_kernel``: a program per tile of ``TR`` view rows of one segment's runs (see
   :mod:`.tiles`), all columns in blocks of ``BC``. For each local element: decompress V and M
   (sign bit × row ⊗ column factors), fold in the gradient, update the weight (both decay
   modes, ``beta=None``), flip the sign bits that changed (a relaxed integer ``atomic_xor`` on
   the 32-bit word: flips of distinct bits commute, so segments may share words and the result
   does not depend on the order; a program reads only bits it alone flips, so no fence), and write the tile's partial row and column sums of V and |M| to
   scratch. No float atomics anywhere.
2. ``_reduce_kernel``: per segment, sums the tiles' partials in tile order (fixed, hence
   deterministic) into the statistic slots that one all_reduce per process group completes.
3. ``_finish_kernel`` (once per step, all batches): complete sums -> normalised factors in the state.

Weights and gradients are read and written in the parameter's dtype (fp32, bf16 or fp16; one
table and set of launches per dtype pair), the math is fp32.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

import torch
import triton
import triton.language as tl
from torch import Tensor

from dist_memopt.kernels import launch
from dist_memopt.kernels.jobs import SMMFJob as _Job, StatSlots
from dist_memopt.kernels.launch import KernelObserver, Reporter
from dist_memopt.kernels.tiles import Batch, BitOffsets, GradFields, Offsets, holding, launched, index_math, load_block, reschedule, runs_advance, runs_cursor, store_block, tile_elements, tile_pieces, tile_warps, tiles_shape, to_dtype_of, upload

__all__ = ["FusedSMMF"]

NF = 13  # int64 fields per tile: w, g, sign bit, rv, cv, rm, cm offsets; start, L, stride, count; k0; row0
NS = 10  # per segment: tile range, 4 slot offsets, 4 state offsets


@launched
def _tile_kernel(W, G, S, S_SHIFT, F, ROWP, COLP, TILES, n, m, lr, beta1, beta2, eps, wd, decay,
                 HAS_M: tl.constexpr, COUPLED: tl.constexpr, RUNS: tl.constexpr, TR: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0)
    info = TILES + t * 13
    w_off, g_off, s_bit = tl.load(info + 0), tl.load(info + 1), tl.load(info + 2)
    rv_off, cv_off, rm_off, cm_off = tl.load(info + 3), tl.load(info + 4), tl.load(info + 5), tl.load(info + 6)
    start, run, stride, count = tl.load(info + 7), tl.load(info + 8), tl.load(info + 9), tl.load(info + 10)
    k0, row0 = tl.load(info + 11), tl.load(info + 12)
    words = (S - S_SHIFT).to(tl.pointer_type(tl.int32))  # the aligned word holding S's first byte
    rows = row0 + tl.arange(0, TR)
    row_ok = rows < n
    rv = tl.load(F + rv_off + rows, mask=row_ok, other=0.0) * beta2  # β·(r ⊗ c) = (β·r) ⊗ c
    acc_v = tl.zeros((TR, BC), dtype=tl.float32)  # row sums per lane, summed across lanes once at the end
    acc_m = tl.zeros((TR, BC), dtype=tl.float32)
    if HAS_M:
        rm = tl.load(F + rm_off + rows, mask=row_ok, other=0.0) * beta1
    piece, within = runs_cursor(rows, m, start, stride, RUNS)  # strided runs: each row's piece at column 0
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < m
        ok, k = tile_elements(rows, row_ok, cols, col_ok, m, start, run, stride, count, k0, piece, within, RUNS)
        piece, within = runs_advance(piece, within, stride, BC, RUNS)
        w = load_block(W + w_off + k, ok).to(tl.float32)  # fp32, bf16 or fp16 weights
        g = load_block(G + g_off + k, ok).to(tl.float32)
        if COUPLED:
            g = tl.fma(wd, w, g)  # one rounding, as torch's add(alpha=) and the CPU kernel
        cv = tl.load(F + cv_off + cols, mask=col_ok, other=0.0)
        v = rv[:, None] * cv[None, :] + (1.0 - beta2) * (g * g)
        v = tl.where(ok, v, 0.0)
        acc_v += v
        tl.store(COLP + (t * 2) * m + cols, tl.sum(v, axis=0), mask=col_ok)
        numerator = g
        if HAS_M:
            bit = s_bit + k  # >= 0 where held: shifts, not signed division
            # the word's load and xor 1-D, as load_block's: 2-D, Triton 3.6 converts every value of the
            # block through shared memory
            at = words + (bit >> 5)
            word = load_block(at, ok)
            shift = (bit & 31).to(tl.int32)
            old = (word >> shift) & 1
            cm = tl.load(F + cm_off + cols, mask=col_ok, other=0.0)
            first = rm[:, None] * cm[None, :] * tl.where(old == 1, 1.0, -1.0) + (1.0 - beta1) * g
            new = (first >= 0).to(tl.int32)
            one = tl.full((TR, BC), 1, tl.int32)
            flip = ok & (new != old)
            tl.atomic_xor(tl.reshape(at, [TR * BC]), tl.reshape(one << shift, [TR * BC]), mask=tl.reshape(flip, [TR * BC]), sem="relaxed")
            magnitude = tl.where(ok, tl.abs(first), 0.0)
            acc_m += magnitude
            tl.store(COLP + (t * 2 + 1) * m + cols, tl.sum(magnitude, axis=0), mask=col_ok)
            numerator = first
        w = w * decay - lr * (numerator / (tl.sqrt(v) + eps))
        store_block(W + w_off + k, to_dtype_of(tl.where(ok, w, 0.0), W), ok)  # masked lanes may overflow
    lanes = tl.arange(0, TR)
    tl.store(ROWP + (t * 2) * TR + lanes, tl.sum(acc_v, axis=1))
    if HAS_M:
        tl.store(ROWP + (t * 2 + 1) * TR + lanes, tl.sum(acc_m, axis=1))


@launched
def _reduce_kernel(ROWP, COLP, TILES, SEGS, OUT, n, m,
                   HAS_M: tl.constexpr, TR: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    s = tl.program_id(0)
    j = tl.program_id(1)
    info = SEGS + s * 10
    lo, hi = tl.load(info + 0), tl.load(info + 1)
    col_blocks = tl.cdiv(m, BC)
    if j < col_blocks:
        cols = j * BC + tl.arange(0, BC)
        ok = cols < m
        # names of their own in each branch: compiled, a runtime `if` merges same-named values
        col_v = tl.zeros((BC,), dtype=tl.float32)
        col_m = tl.zeros((BC,), dtype=tl.float32)
        for t in range(lo, hi):  # tile order: a fixed summation order
            col_v += tl.load(COLP + (t * 2) * m + cols, mask=ok, other=0.0)
            if HAS_M:
                col_m += tl.load(COLP + (t * 2 + 1) * m + cols, mask=ok, other=0.0)
        tl.store(OUT + tl.load(info + 3) + cols, col_v, mask=ok)
        if HAS_M:
            tl.store(OUT + tl.load(info + 5) + cols, col_m, mask=ok)
    else:
        rows = (j - col_blocks) * BR + tl.arange(0, BR)
        row_v = tl.zeros((BR,), dtype=tl.float32)
        row_m = tl.zeros((BR,), dtype=tl.float32)
        for t in range(lo, hi):
            at = rows - tl.load(TILES + t * 13 + 12)
            held = (at >= 0) & (at < TR)
            row_v += tl.load(ROWP + (t * 2) * TR + at, mask=held, other=0.0)
            if HAS_M:
                row_m += tl.load(ROWP + (t * 2 + 1) * TR + at, mask=held, other=0.0)
        in_view = rows < n
        tl.store(OUT + tl.load(info + 2) + rows, row_v, mask=in_view)
        if HAS_M:
            tl.store(OUT + tl.load(info + 4) + rows, row_m, mask=in_view)


@launched
def _finish_kernel(OUT, F, SEGS, SHAPES, BLOCK: tl.constexpr):
    """Factors = complete sums, the shorter side divided by its total (when non-zero)."""
    s = tl.program_id(0)
    pair = tl.program_id(1)  # 0: V, 1: |M|
    info = SEGS + s * 10
    n, m, pairs = tl.load(SHAPES + s * 3), tl.load(SHAPES + s * 3 + 1), tl.load(SHAPES + s * 3 + 2)
    row_in, col_in = tl.load(info + 2 + 2 * pair), tl.load(info + 3 + 2 * pair)
    row_out, col_out = tl.load(info + 6 + 2 * pair), tl.load(info + 7 + 2 * pair)
    if pair < pairs:
        short_in = tl.where(n <= m, row_in, col_in)
        short = tl.where(n <= m, n, m)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, short, BLOCK):
            lanes = i + tl.arange(0, BLOCK)
            total += tl.load(OUT + short_in + lanes, mask=lanes < short, other=0.0)
        whole = tl.sum(total, axis=0)
        scale = tl.where(whole > 0, whole, 1.0)
        row_scale = tl.where(n <= m, scale, 1.0)
        col_scale = tl.where(n <= m, 1.0, scale)
        for i in range(0, n, BLOCK):
            lanes = i + tl.arange(0, BLOCK)
            x = tl.load(OUT + row_in + lanes, mask=lanes < n, other=0.0)
            tl.store(F + row_out + lanes, x / row_scale, mask=lanes < n)
        for i in range(0, m, BLOCK):
            lanes = i + tl.arange(0, BLOCK)
            x = tl.load(OUT + col_in + lanes, mask=lanes < m, other=0.0)
            tl.store(F + col_out + lanes, x / col_scale, mask=lanes < m)


@dataclass
class _Batch(Batch):
    """One tile launch and one reduce launch."""

    tiles_at: int
    seg_at: int


@dataclass
class _Table:
    """The launches of one dtype pair and the int64 table they share, built on the host."""

    jobs: list[_Job]
    holder: int  # the job whose tensors are the base pointers
    bases: dict[str, Tensor]  # but the gradients' (G): this step's, read from the holder's item, never kept
    words_shift: int
    table: Tensor  # CPU int64
    batches: list[_Batch]
    segs_at: int
    shapes_at: int
    seg_count: int
    moved: int
    grads: GradFields
    on_device: Optional[Tensor] = None  # the table's copy the kernels read, while it matches the host's


class FusedSMMF:
    """One step's fused segments: :meth:`run` steps them, :meth:`finish` stores their factors.

    Jobs with the same (n, m) view, device and schedule make one batch: one tile launch and one
    reduce launch, whatever the number of segments. All launches of a dtype pair share one int64
    table (one host-to-device copy), built by :meth:`prepare` before the step's checks and kept
    by the optimizer for the next step of the same segments (:meth:`reuse`), which writes only
    the new gradients' offsets into it.
    """

    def __init__(self, observer: Optional[KernelObserver] = None) -> None:
        self._report = Reporter(observer, "triton.")  # see dist_memopt.kernels.launch
        self._jobs: list[_Job] = []
        self._tables: list[_Table] = []
        self._finish: list[tuple[dict[str, Tensor], Tensor, Tensor, int, int]] = []  # per dtype pair

    def add(self, item: Any, seg: Any, hp: Any, slots: StatSlots) -> None:
        self._jobs.append(_Job(item, seg, hp, slots))

    def prepare(self) -> None:
        """The launch tables of the segments added so far, per dtype pair (weights and gradients
        of one pair are addressed as offsets from one pointer of that dtype): reads addresses,
        changes nothing."""
        by_dtype: dict[tuple, list[_Job]] = defaultdict(list)
        for job in self._jobs:
            by_dtype[(job.item.weight.dtype, job.item.grad.dtype)].append(job)
        self._tables += [_build(jobs) for jobs in by_dtype.values()]
        self._jobs = []

    def route(self, schedules: list[Any]) -> Any:
        """What decides which tables a step builds besides its segments: nothing for SMMF."""
        return None

    def prepared(self) -> list[_Table]:
        """The tables :meth:`prepare` built, for :meth:`reuse` at a later step of the same segments."""
        return list(self._tables)

    def reuse(self, prepared: list[_Table], schedule_of: dict[int, Any]) -> bool:
        """Take :meth:`prepared` tables again with this step's gradients and schedules
        (``schedule_of``: by id of item); False, with nothing taken, where a batch's segments no
        longer share one schedule."""
        if not reschedule((batch for table in prepared for batch in table.batches), schedule_of):
            return False
        for table in prepared:
            if table.grads.patch(table.table, table.jobs, table.jobs[table.holder].item.grad):
                table.on_device = None
        self._tables += prepared
        return True

    def run(self) -> None:
        """Launch every batch of every table."""
        self.prepare()
        for table in self._tables:
            self._run(table)
        self._tables = []

    def _run(self, table: _Table) -> None:
        bases = {**table.bases, "G": table.jobs[table.holder].item.grad}
        device = bases["W"].device
        if table.on_device is None or table.on_device.device != device:
            table.on_device = upload(table.table, device)
            self._report.record("copy_table", 0, table.table.numel() * 8)
        tensor = table.on_device
        for b in table.batches:
            self._launch(bases, table.words_shift, tensor, b.n, b.m, b.hp, b.index, b.tiles_at, b.tile_count, b.seg_at, b.seg_count, b.numel)
        self._finish.append((bases, tensor[table.segs_at : table.shapes_at], tensor[table.shapes_at :], table.seg_count, table.moved))

    def _launch(self, bases: dict[str, Tensor], words_shift: int, table: Tensor, n: int, m: int, hp: Any, index: dict[str, int],
                tiles_at: int, tile_count: int, seg_at: int, seg_count: int, numel: int) -> None:
        if tile_count == 0:
            return  # empty shards: their slots stay zero, which is their contribution
        rows_per_tile, columns = tiles_shape(m)
        has_m = hp.beta1 is not None
        pairs = 2 if has_m else 1
        device = bases["W"].device
        rowp = torch.empty(tile_count * 2 * rows_per_tile, dtype=torch.float32, device=device)
        colp = torch.empty(tile_count * 2 * m, dtype=torch.float32, device=device)
        tiles, segs = table[tiles_at : tiles_at + tile_count * NF], table[seg_at : seg_at + seg_count * NS]
        decay = 1.0 - hp.lr * hp.weight_decay if hp.decoupled_decay else 1.0
        if self._report.executing:
            _tile_kernel[(tile_count,)](
                bases["W"], bases["G"], bases["S"], words_shift, bases["F"], rowp, colp, tiles, n, m,
                hp.lr, hp.beta1 if has_m else 0.0, hp.beta2, hp.eps, hp.weight_decay, decay,
                HAS_M=has_m, COUPLED=hp.coupled_decay, **index, TR=rows_per_tile, BC=columns, **tile_warps(rows_per_tile, columns),
            )
        partials = tile_count * pairs * (rows_per_tile + m) * 4
        factors = tile_count * pairs * (rows_per_tile + m) * 4
        signs = (numel + 7) // 8 if has_m else 0
        w_size, g_size = bases["W"].element_size(), bases["G"].element_size()
        self._report.record("smmf_tiles", numel * (w_size + g_size) + signs + factors + tile_count * NF * 8, numel * w_size + signs + partials)
        row_block = 128
        grid = (seg_count, triton.cdiv(m, columns) + triton.cdiv(n, row_block))
        if self._report.executing:
            _reduce_kernel[grid](rowp, colp, tiles, segs, bases["OUT"], n, m, HAS_M=has_m, TR=rows_per_tile, BR=row_block, BC=columns,
                                 **launch.OPTIONS)
        self._report.record("smmf_reduce", partials + seg_count * NS * 8, seg_count * pairs * (n + m) * 4)

    def finish(self) -> None:
        """After the statistics are complete: normalised factors into the state, one launch per
        dtype pair (one in a model of one dtype)."""
        for bases, segs, shapes, count, moved in self._finish:
            if self._report.executing:
                _finish_kernel[(count, 2)](bases["OUT"], bases["F"], segs, shapes, BLOCK=256, **launch.OPTIONS)
            self._report.record("smmf_finish", moved, moved // 2)
        self._finish = []


def _build(jobs_of_dtype: list[_Job]) -> _Table:
    """The table of one dtype pair's launches: per batch its tiles (:data:`NF` fields each) and
    segments (:data:`NS`), then every segment again for the finish launch, then their shapes."""
    holder = holding(jobs_of_dtype)
    first = jobs_of_dtype[holder]
    signs = [j.item.state["sign"] for j in jobs_of_dtype if "sign" in j.item.state and j.item.state["sign"].numel()]
    sign_base = min(signs, key=Tensor.data_ptr) if signs else first.item.state["row_v"]
    bases = dict(W=first.item.weight, F=first.item.state["row_v"], OUT=first.slots.view("row_v"), S=sign_base)
    bit_at = BitOffsets(sign_base)  # the lowest sign byte: every sign offset is >= 0
    w_at, f_at, out_at = (Offsets(bases[k]) for k in ("W", "F", "OUT"))
    g_at = Offsets(first.item.grad)
    grouped: dict[tuple, list[int]] = defaultdict(list)
    for index, job in enumerate(jobs_of_dtype):
        geo = job.seg.geometry
        grouped[(geo.rows, geo.cols, job.item.weight.device, job.hp)].append(index)
    table: list[int] = []
    batches = []
    all_segs: list[int] = []
    shapes: list[int] = []
    grads = GradFields()
    for (n, m, _, hp), members in grouped.items():
        rows_per_tile, _ = tiles_shape(m)
        tiles: list[int] = []
        segs: list[int] = []
        numel = 0
        for index in members:
            job = jobs_of_dtype[index]
            tile_lo = len(tiles) // NF
            state, seg = job.item.state, job.seg
            local_w, local_g = seg.local(job.item.weight), seg.local(job.item.grad)
            bit = -1
            if hp.beta1 is not None:
                bit = bit_at(seg.bits(state["sign"]))
            head = [w_at(local_w), g_at(local_g), bit, f_at(seg.rows(state["row_v"])), f_at(seg.cols(state["col_v"]))]
            if hp.beta1 is not None:
                head += [f_at(seg.rows(state["row_m"])), f_at(seg.cols(state["col_m"]))]
            else:
                head += [0, 0]
            for fields in tile_pieces(seg.geometry, rows_per_tile):
                grads.add(len(table) + len(tiles) + 1, index)
                tiles += head + fields
            numel += seg.segment.numel
            rv, cv, rm, cm = (job.slots.view(name) for name in ("row_v", "col_v", "row_m", "col_m"))
            entry = [tile_lo, len(tiles) // NF, out_at(rv), out_at(cv), out_at(rm), out_at(cm)]
            entry += [f_at(seg.rows(state["row_v"])), f_at(seg.cols(state["col_v"]))]
            entry += [f_at(seg.rows(state["row_m"])), f_at(seg.cols(state["col_m"]))] if rm is not None else [0, 0]
            segs += entry
            shapes += [n, m, 1 if rm is None else 2]
        jobs = [jobs_of_dtype[i] for i in members]
        index_constexpr = index_math((job.seg.geometry for job in jobs), tiles_shape(m)[1])
        batches.append(_Batch(n=n, m=m, hp=hp, index=index_constexpr, tile_count=len(tiles) // NF, seg_count=len(jobs), numel=numel, jobs=jobs,
                              tiles_at=len(table), seg_at=len(table) + len(tiles)))
        all_segs += segs
        table += tiles + segs
    segs_at = len(table)
    table += all_segs
    shapes_at = len(table)
    table += shapes
    moved = sum(2 * (j.seg.geometry.rows + j.seg.geometry.cols) * 4 * (2 if "row_m" in j.slots.sizes else 1) for j in jobs_of_dtype)
    cpu = torch.from_numpy(np.array(table, dtype=np.int64))
    return _Table(jobs_of_dtype, holder, bases, bit_at.shift, cpu, batches, segs_at, shapes_at, len(all_segs) // NS, moved, grads)
