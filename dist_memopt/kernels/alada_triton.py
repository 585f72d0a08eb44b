"""Alada's step as fused Triton kernels: two passes over the elements, the fewest its algorithm allows.

The same equations as :func:`dist_memopt.optim.alada._partial_statistics` and
:func:`~dist_memopt.optim.alada._refit_and_update`. The refit of p (or q) needs the *complete*
statistic V·q (or Vᵀ·p) over every element of the parameter, on every rank, before any weight can
be updated with the refitted factors: so one pass computes M and the statistic, the all_reduce
completes it, and a second pass updates the weights. Per batch of segments sharing a view and a
schedule: ``_stats_kernel`` (M, partial statistic and ‖G0‖² per tile) and ``_reduce_kernel``
(tiles summed in tile order: deterministic) before the all_reduce; after it, ``_refit_kernel``
(float64, one program per segment, once per step for all batches) and ``_update_kernel``.
Weights, gradients and M in ``.grad`` are read and written in the parameter's dtype (fp32, bf16
or fp16; batches split by dtype), the math is fp32 (p, q and v0 float64, and the differences
that form Ũ from them).
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
from dist_memopt.kernels.jobs import AladaJob as _Job, StatSlots, alada_route
from dist_memopt.kernels.launch import KernelObserver, Reporter
from dist_memopt.kernels.tiles import TILE_FIELDS, Batch, GradFields, Offsets, holding, launched, index_math, load_block, reschedule, runs_advance, runs_cursor, store_block, tile_elements, tile_pieces, tile_warps, tiles_shape, to_dtype_of, upload

__all__ = ["FusedAlada"]

NF = 6 + TILE_FIELDS  # per tile: w, g, m (momentum), p, q, v0 offsets; then the tile's runs fields
# w and g count from the batch's W and G pointers (the parameters' dtype), m from G when .grad
# holds M and from F (fp32: M as state, the statistic slots) otherwise
NS = 9  # per segment: tile range, stat / norm slot offsets, p, q, v0 offsets, n, m


@launched
def _stats_kernel(F, G, P64, ROWP, COLP, NORMP, TILES, n, m, beta1, bias1, g0_div,
                  ODD: tl.constexpr, FIRST: tl.constexpr, IN_GRAD: tl.constexpr, RUNS: tl.constexpr, TR: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(0)
    info = TILES + t * 12
    g_off, m_off, p_off, q_off = tl.load(info + 1), tl.load(info + 2), tl.load(info + 3), tl.load(info + 4)
    start, run, stride, count = tl.load(info + 6), tl.load(info + 7), tl.load(info + 8), tl.load(info + 9)
    k0, row0 = tl.load(info + 10), tl.load(info + 11)
    rows = row0 + tl.arange(0, TR)
    row_ok = rows < n
    acc = tl.zeros((TR, BC), dtype=tl.float32)  # per lane; summed across lanes once, after the loop
    norm = tl.zeros((TR, BC), dtype=tl.float32)
    if ODD:
        p = tl.load(P64 + p_off + rows, mask=row_ok, other=0.0).to(tl.float32)
    piece, within = runs_cursor(rows, m, start, stride, RUNS)  # strided runs: each row's piece at column 0
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < m
        held, k = tile_elements(rows, row_ok, cols, col_ok, m, start, run, stride, count, k0, piece, within, RUNS)
        piece, within = runs_advance(piece, within, stride, BC, RUNS)
        g = load_block(G + g_off + k, held).to(tl.float32)  # fp32, bf16 or fp16
        if IN_GRAD:
            momentum = g  # .grad holds M
        else:
            momentum = load_block(F + m_off + k, held) * beta1 + (1.0 - beta1) * g
            store_block(F + m_off + k, momentum, held)
        second = momentum / bias1
        second = tl.where(held, second * second, 0.0)
        if ODD:  # Vᵀ·p, partial over this tile's rows
            tl.store(COLP + t * m + cols, tl.sum(second * p[:, None], axis=0), mask=col_ok)
        elif FIRST:  # rowsum(V): V·q_0 = sqrt(v0)·rowsum(V) once v0 is known
            acc += second
        else:
            q = tl.load(P64 + q_off + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += second * q[None, :]
        if FIRST:
            g0 = g / g0_div
            norm += tl.where(held, g0 * g0, 0.0)
    lanes = tl.arange(0, TR)
    if not ODD:
        tl.store(ROWP + t * TR + lanes, tl.sum(acc, axis=1))
    if FIRST:
        tl.store(NORMP + t, tl.sum(tl.sum(norm, axis=1), axis=0))


@launched
def _reduce_kernel(ROWP, COLP, NORMP, TILES, SEGS, OUT, n, m,
                   ODD: tl.constexpr, FIRST: tl.constexpr, TR: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    j = tl.program_id(1)
    info = SEGS + s * 9
    lo, hi, stat_off, norm_off = tl.load(info + 0), tl.load(info + 1), tl.load(info + 2), tl.load(info + 3)
    lanes = j * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(lo, hi):  # tile order: a fixed summation order
        if ODD:
            acc += tl.load(COLP + t * m + lanes, mask=lanes < m, other=0.0)
        else:
            at = lanes - tl.load(TILES + t * 12 + 11)
            acc += tl.load(ROWP + t * TR + at, mask=(at >= 0) & (at < TR), other=0.0)
    if ODD:
        limit = m
    else:
        limit = n
    tl.store(OUT + stat_off + lanes, acc, mask=lanes < limit)
    if FIRST:
        if j == 0:
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for t in range(lo, hi, BLOCK):
                at = t + tl.arange(0, BLOCK)
                total += tl.load(NORMP + at, mask=at < hi, other=0.0)
            tl.store(OUT + norm_off, tl.sum(total, axis=0))


@launched
def _refit_kernel(OUT, P64, SEGS, beta2: tl.float64, eps: tl.float64, ODD: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """p ← β2·p + (1 − β2)·V q/(‖q‖² + eps) (even t) or q likewise (odd t), in float64; v0 at t = 0."""
    s = tl.program_id(0)
    info = SEGS + s * 9
    stat_off, norm_off = tl.load(info + 2), tl.load(info + 3)
    p_off, q_off, v0_off = tl.load(info + 4), tl.load(info + 5), tl.load(info + 6)
    n, m = tl.load(info + 7), tl.load(info + 8)
    if FIRST:
        v0 = tl.load(OUT + norm_off).to(tl.float64) / (n * m)
        tl.store(P64 + v0_off, v0)
        root = tl.sqrt(v0)
    if ODD:
        own_off, own_len, other_off, other_len = q_off, m, p_off, n
    else:
        own_off, own_len, other_off, other_len = p_off, n, q_off, m
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for i in range(0, other_len, BLOCK):
        lanes = i + tl.arange(0, BLOCK)
        if FIRST:
            other = tl.where(lanes < other_len, root, 0.0)
        else:
            other = tl.load(P64 + other_off + lanes, mask=lanes < other_len, other=0.0)
        total += other * other
    scale = 1.0 / (tl.sum(total, axis=0) + eps)
    for i in range(0, own_len, BLOCK):
        lanes = i + tl.arange(0, BLOCK)
        ok = lanes < own_len
        stat = tl.load(OUT + stat_off + lanes, mask=ok, other=0.0).to(tl.float64)
        if FIRST:
            stat = stat * root
            own = tl.zeros((BLOCK,), dtype=tl.float64) + root
        else:
            own = tl.load(P64 + own_off + lanes, mask=ok, other=0.0)
        tl.store(P64 + own_off + lanes, own * beta2 + (1.0 - beta2) * (stat * scale), mask=ok)
    if FIRST:  # the other factor starts at sqrt(v0) too
        for i in range(0, other_len, BLOCK):
            lanes = i + tl.arange(0, BLOCK)
            tl.store(P64 + other_off + lanes, tl.zeros((BLOCK,), dtype=tl.float64) + root, mask=lanes < other_len)


@launched
def _update_kernel(F, W, G, P64, TILES, n, m, lr, eps, eps64: tl.float64, bias1, bias2: tl.float64,
                   power_p: tl.float64, power_q: tl.float64, decay,
                   IN_GRAD: tl.constexpr, RUNS: tl.constexpr, TR: tl.constexpr, BC: tl.constexpr):
    """W ← W·decay − lr·M̃/√max(Ũ + eps, eps), with Ũ + eps = rows ⊗ cols + row_shift as on the torch
    path (``alada._denominator_terms``): float64 differences on the tile's p and q, fp32 per element.
    The scalars feeding those differences are float64 (a GPU would pass plain floats as fp32, whose
    rounding of β2^k alone is larger than what the differences resolve)."""
    t = tl.program_id(0)
    info = TILES + t * 12
    w_off, m_off, p_off, q_off, v0_off = tl.load(info + 0), tl.load(info + 2), tl.load(info + 3), tl.load(info + 4), tl.load(info + 5)
    start, run, stride, count = tl.load(info + 6), tl.load(info + 7), tl.load(info + 8), tl.load(info + 9)
    k0, row0 = tl.load(info + 10), tl.load(info + 11)
    rows = row0 + tl.arange(0, TR)
    row_ok = rows < n
    root = tl.sqrt(tl.load(P64 + v0_off))
    x_p = root * power_p  # p's decayed start: p ≥ x_p
    x_q = root * power_q
    shift_scale = x_q / bias2  # before the rows' divisions: after them, Triton 3.6 keeps a register on the stack
    p = tl.load(P64 + p_off + rows, mask=row_ok, other=0.0)
    row_shift = ((p - x_p) * shift_scale + eps64).to(tl.float32)
    row_factor = (p / bias2).to(tl.float32)
    piece, within = runs_cursor(rows, m, start, stride, RUNS)  # strided runs: each row's piece at column 0
    for c0 in range(0, m, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < m
        held, k = tile_elements(rows, row_ok, cols, col_ok, m, start, run, stride, count, k0, piece, within, RUNS)
        piece, within = runs_advance(piece, within, stride, BC, RUNS)
        q = tl.load(P64 + q_off + cols, mask=col_ok, other=0.0)
        col_factor = (q - x_q).to(tl.float32)
        refit = row_factor[:, None] * col_factor[None, :] + row_shift[:, None]
        denominator = tl.sqrt(tl.maximum(refit, eps))
        w = load_block(W + w_off + k, held).to(tl.float32) * decay
        if IN_GRAD:
            momentum = load_block(G + m_off + k, held).to(tl.float32)
        else:
            momentum = load_block(F + m_off + k, held)
        w = w - (lr / bias1) * (momentum / denominator)
        store_block(W + w_off + k, to_dtype_of(tl.where(held, w, 0.0), W), held)


@dataclass
class _Batch(Batch):
    """A statistics, a reduce and an update launch (segments of one dtype pair too)."""

    at: int  # the batch's tiles, then its segments, in the table
    holder: int  # the job whose weight and gradient are the batch's base pointers
    w_base: Tensor  # (the gradients' base is this step's, read from the holder's item, never kept)
    grads: GradFields


@dataclass
class _Table:
    """Every launch of one step's segments and the int64 table they share, built on the host."""

    jobs: list[_Job]
    f32: Tensor
    p64: Tensor
    table: Tensor  # CPU int64
    batches: list[_Batch]
    refits: list[tuple[tuple, int, int]]  # (parity, first step, β2, eps), where, segments
    on_device: Optional[Tensor] = None  # the table's copy the kernels read, while it matches the host's


class FusedAlada:
    """One step's fused segments: :meth:`statistics` before the all_reduce, :meth:`update` after.

    Segments with the same (n, m) view, device and schedule make one batch (a statistics, a
    reduce and an update launch); the refit is one launch per (parity, first step, β2, eps),
    in practice one per step. All launches share one int64 table (one host-to-device copy),
    built by :meth:`prepare` before the step's checks and kept by the optimizer for the next step
    of the same segments and phases (:meth:`reuse`), which writes only the new gradients' offsets
    into it.
    """

    def __init__(self, observer: Optional[KernelObserver] = None) -> None:
        self._report = Reporter(observer, "triton.")  # see dist_memopt.kernels.launch
        self._jobs: list[_Job] = []
        self._table: Optional[_Table] = None
        self._batches: list[tuple] = []
        self._refits: list[tuple] = []
        self._bases: Optional[tuple[Tensor, Tensor]] = None
        self._stepped: list[_Job] = []

    def add(self, item: Any, seg: Any, hp: Any, slots: StatSlots) -> None:
        self._jobs.append(_Job(item, seg, hp, slots))

    def prepare(self) -> None:
        """The launch table of the segments added so far: reads addresses, changes nothing."""
        if self._jobs:
            assert self._table is None, "one table per step"
            self._table = _build(self._jobs)
            self._jobs = []

    def route(self, schedules: list[Any]) -> Any:
        """The phases of the schedules (:func:`~dist_memopt.kernels.jobs.alada_route`)."""
        return alada_route(schedules)

    def prepared(self) -> Optional[_Table]:
        """The table :meth:`prepare` built, for :meth:`reuse` at a later step of the same segments and phases."""
        return self._table

    def reuse(self, prepared: Optional[_Table], schedule_of: dict[int, Any]) -> bool:
        """Take a :meth:`prepared` table again with this step's gradients and schedules
        (``schedule_of``: by id of item); False, with nothing taken, where a batch's segments no
        longer share one schedule."""
        if prepared is None:
            return False
        if not reschedule(prepared.batches, schedule_of):
            return False
        for batch in prepared.batches:
            if batch.grads.patch(prepared.table, batch.jobs, batch.jobs[batch.holder].item.grad):
                prepared.on_device = None
        self._table = prepared
        return True

    def statistics(self) -> None:
        self.prepare()
        if self._table is None:
            return
        built, self._table = self._table, None
        if built.on_device is None or built.on_device.device != built.f32.device:
            built.on_device = upload(built.table, built.f32.device)
            self._report.record("copy_table", 0, built.table.numel() * 8)
        device_table = built.on_device
        for b in built.batches:
            g_base = b.jobs[b.holder].item.grad
            tiles = device_table[b.at : b.at + b.tile_count * NF]
            segs = device_table[b.at + b.tile_count * NF : b.at + b.tile_count * NF + b.seg_count * NS]
            self._statistics(built.f32, g_base, built.p64, tiles, segs, b.n, b.m, b.hp, b.index, b.tile_count, b.seg_count, b.numel)
            self._batches.append((b.n, b.m, b.hp, b.index, b.w_base, g_base, tiles, b.tile_count, b.numel))
        self._refits = [(key, device_table[at : at + count * NS], count) for key, at, count in built.refits]
        self._bases = (built.f32, built.p64)
        self._stepped = built.jobs

    def _statistics(self, f32: Tensor, grads: Tensor, p64: Tensor, tiles: Tensor, segs: Tensor, n: int, m: int, hp: Any, index: dict[str, int],
                    tile_count: int, seg_count: int, numel: int) -> None:
        if not tile_count:
            return  # empty shards: their slots stay zero, which is their contribution
        rows_per_tile, columns = tiles_shape(m)
        odd, first = hp.t % 2 == 1, hp.t == 0
        rowp = torch.empty(tile_count * rows_per_tile, dtype=torch.float32, device=f32.device)
        colp = torch.empty(tile_count * m, dtype=torch.float32, device=f32.device)
        normp = torch.empty(tile_count, dtype=torch.float32, device=f32.device)
        block = 128
        if self._report.executing:
            _stats_kernel[(tile_count,)](
                f32, grads, p64, rowp, colp, normp, tiles, n, m, hp.beta1, hp.bias1, (1.0 - hp.beta1) if hp.in_grad else 1.0,
                ODD=odd, FIRST=first, IN_GRAD=hp.in_grad, **index, TR=rows_per_tile, BC=columns, **tile_warps(rows_per_tile, columns),
            )
            _reduce_kernel[(seg_count, triton.cdiv(m if odd else n, block))](
                rowp, colp, normp, tiles, segs, f32, n, m, ODD=odd, FIRST=first, TR=rows_per_tile, BLOCK=block,
                **launch.OPTIONS,
            )
        partials = tile_count * ((m if odd else rows_per_tile) + first) * 4
        factors = tile_count * (rows_per_tile if odd else m) * 8
        moved = numel * (grads.element_size() + (0 if hp.in_grad else 4))  # G, and M unless .grad holds it
        self._report.record("alada_stats", moved + factors + tile_count * NF * 8, numel * (0 if hp.in_grad else 4) + partials)
        self._report.record("alada_reduce", partials + seg_count * NS * 8, seg_count * ((m if odd else n) + first) * 4)

    def update(self) -> None:
        """After the all_reduce: refit every segment's p or q, then update the weights."""
        if self._bases is None:
            return
        f32, p64 = self._bases
        for (odd, first, beta2, eps), segs, count in self._refits:
            if self._report.executing:
                _refit_kernel[(count,)](f32, p64, segs, beta2, eps, ODD=odd, FIRST=first, BLOCK=256, **launch.OPTIONS)
            moved = sum(2 * (j.seg.geometry.rows + j.seg.geometry.cols) * 8 for j in self._stepped) // len(self._refits)
            self._report.record("alada_refit", moved, moved // 2)
        for n, m, hp, index, w_base, g_base, tiles, tile_count, numel in self._batches:
            if not tile_count:
                continue
            rows_per_tile, columns = tiles_shape(m)
            decay = 1.0 - hp.lr * hp.weight_decay
            if self._report.executing:
                _update_kernel[(tile_count,)](
                    # eps twice: fp32 for the clamp, float64 for the shift (the interpreter passes plain
                    # floats as Python floats, which have no .to() to narrow one into the other)
                    f32, w_base, g_base, p64, tiles, n, m, hp.lr, hp.eps, hp.eps, hp.bias1, hp.bias2,
                    *hp.start_decays, decay,
                    IN_GRAD=hp.in_grad, **index, TR=rows_per_tile, BC=columns, **tile_warps(rows_per_tile, columns),
                )
            w_size = w_base.element_size()
            m_size = g_base.element_size() if hp.in_grad else 4
            factors = tile_count * (rows_per_tile + m) * 8
            self._report.record("alada_update", numel * (w_size + m_size) + factors + tile_count * NF * 8, numel * w_size)


def _build(jobs: list[_Job]) -> _Table:
    """The table of a step's launches: per batch its tiles (:data:`NF` fields each) and segments
    (:data:`NS`), then each refit group's segments again."""
    first = jobs[0]
    f32, p64 = first.stat, first.item.state["row"]
    f_at, p_at = Offsets(f32), Offsets(p64)
    grouped: dict[tuple, list[_Job]] = defaultdict(list)
    for job in jobs:
        geo, item = job.seg.geometry, job.item
        grouped[(geo.rows, geo.cols, item.weight.device, item.weight.dtype, item.grad.dtype, job.hp)].append(job)
    table: list[int] = []
    batches = []
    refits: dict[tuple, list[int]] = defaultdict(list)
    for (n, m, _, _, _, hp), members in grouped.items():
        rows_per_tile, _ = tiles_shape(m)
        holder = holding(members)
        w_base, g_base = members[holder].item.weight, members[holder].item.grad  # this batch's dtypes
        w_at, g_at = Offsets(w_base), Offsets(g_base)
        tiles: list[int] = []
        segs: list[int] = []
        grads = GradFields()
        for index, job in enumerate(members):
            state, seg = job.item.state, job.seg
            grad = seg.local(job.item.grad)
            momentum = g_at(grad) if hp.in_grad else f_at(seg.elems(state["exp_avg"]))
            p, q, v0 = seg.rows(state["row"]), seg.cols(state["col"]), state["v0"][seg.factor_index : seg.factor_index + 1]
            head = [w_at(seg.local(job.item.weight)), g_at(grad), momentum, p_at(p), p_at(q), p_at(v0)]
            lo = len(tiles) // NF
            for fields in tile_pieces(seg.geometry, rows_per_tile):
                place = len(table) + len(tiles)
                grads.add(place + 1, index)
                if hp.in_grad:
                    grads.add(place + 2, index)  # M in .grad: addressed from G too
                tiles += head + fields
            entry = [lo, len(tiles) // NF, f_at(job.stat), f_at(job.norm), p_at(p), p_at(q), p_at(v0), n, m]
            segs += entry
            refits[(hp.t % 2 == 1, hp.t == 0, hp.beta2, hp.eps)] += entry
        numel = sum(j.seg.segment.numel for j in members)
        index_constexpr = index_math((job.seg.geometry for job in members), tiles_shape(m)[1])
        batches.append(_Batch(n=n, m=m, hp=hp, index=index_constexpr, tile_count=len(tiles) // NF, seg_count=len(members), numel=numel, jobs=members,
                              at=len(table), holder=holder, w_base=w_base, grads=grads))
        table += tiles + segs
    refit_at = []
    for key, entries in refits.items():
        refit_at.append((key, len(table), len(entries) // NS))
        table += entries
    return _Table(jobs, f32, p64, torch.from_numpy(np.array(table, dtype=np.int64)), batches, refit_at)
