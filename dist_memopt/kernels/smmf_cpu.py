"""SMMF's step as a fused CPU kernel: one pass over each element (C++, ``csrc/smmf.h``).

The same equations as :func:`dist_memopt.optim.smmf._factored_step` and the Triton tile kernel:
per element, read the weight, the gradient and the sign bit, write the weight and the sign bit
(about 12.3 bytes per fp32 element), and add V and |M| to per-tile row and column partials that
are summed in tile order into the statistic slots (deterministic for any thread count). After the
all_reduce completes the slots, :meth:`CpuSMMF.finish` normalises them into the state's factors.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from dist_memopt.kernels.jobs import SMMFJob as _Job, StatSlots
from dist_memopt.kernels.launch import KernelObserver, Reporter
from dist_memopt.kernels.cpu_build import cpu_kernels
from dist_memopt.kernels.cpu_tables import add_runs, batched, check_flat, dtype_code, grad_offsets, int64_table, patch_grads, rebatched

__all__ = ["CpuSMMF"]

FIELDS = 13  # n, m, w, g, sign, r_V, c_V, r_M, c_M, then the four statistic slots (csrc/smmf.h)
GRAD_FIELD = 3


class CpuSMMF:
    """One step's segments on CPU: :meth:`run` steps them, :meth:`finish` stores their factors.

    Segments of one dtype and schedule make one call, whatever their shapes and layouts.
    """

    def __init__(self, observer: Optional[KernelObserver] = None) -> None:
        self._report = Reporter(observer, "cpu.")
        self._jobs: list[_Job] = []
        self._batches: list[tuple[Any, Any, list[_Job], Tensor, Tensor, int]] = []  # tables built by prepare()
        self._finish: list[tuple[Tensor, bool, int]] = []

    def add(self, item: Any, seg: Any, hp: Any, slots: StatSlots) -> None:
        check_flat(item.name, item.weight, item.grad)
        self._jobs.append(_Job(item, seg, hp, slots))

    def prepare(self) -> None:
        """The kernel tables of the segments added so far (reads addresses, changes nothing: the
        step builds them while the finite check runs)."""
        self._batches += [(dtype, hp, jobs, *_tables(jobs)) for (dtype, hp), jobs in batched(self._jobs).items()]
        self._jobs = []

    def route(self, schedules: list[Any]) -> Any:
        """What decides which tables a step builds besides its segments: nothing for SMMF."""
        return None

    def prepared(self) -> list[tuple]:
        """The tables :meth:`prepare` built, for :meth:`reuse` at a later step of the same segments."""
        return [(dtype, hp, jobs, segs, runs, numel, grad_offsets(jobs)) for dtype, hp, jobs, segs, runs, numel in self._batches]

    def reuse(self, prepared: list[tuple], schedule_of: dict[int, Any]) -> bool:
        """Take :meth:`prepared` tables again, with this step's gradient addresses and schedules
        (``schedule_of``: by id of item); False, with nothing taken, where a batch's segments no
        longer share one schedule."""
        batches = rebatched(prepared, schedule_of)
        if batches is None:
            return False
        for dtype, hp, jobs, segs, runs, numel, offsets in batches:
            patch_grads(segs, jobs, offsets, (GRAD_FIELD,))
            self._batches.append((dtype, hp, jobs, segs, runs, numel))
        return True

    def run(self) -> None:
        self.prepare()
        kernels = cpu_kernels()
        for dtype, hp, jobs, segs, runs, numel in self._batches:
            has_m = hp.beta1 is not None
            decay = 1.0 - hp.lr * hp.weight_decay if hp.decoupled_decay else 1.0
            if self._report.executing:
                partials = kernels.smmf_step(segs, runs, dtype_code(dtype), dtype_code(dtype), hp.lr, hp.beta1 if has_m else 0.0, hp.beta2,
                                             hp.eps, hp.weight_decay, decay, has_m, hp.coupled_decay)
            else:
                partials = sum(kernels.tile_partials(segs, runs, 1)[:2]) * (2 if has_m else 1)
            factors = sum(j.seg.geometry.rows + j.seg.geometry.cols for j in jobs) * 4 * (2 if has_m else 1)
            size = dtype.itemsize
            signs = (numel + 7) // 8 if has_m else 0
            # tile partials: written, then read once more when summed in tile order
            self._report.record("smmf", numel * 2 * size + signs + factors + 4 * partials, numel * size + signs + factors + 4 * partials)
            self._finish.append((segs, has_m, factors))
        self._batches = []

    def finish(self) -> None:
        """After the statistics are complete: normalised factors into the state."""
        kernels = cpu_kernels() if self._finish else None
        for segs, has_m, factors in self._finish:
            if self._report.executing:
                kernels.smmf_finish(segs, has_m)
            self._report.record("smmf_finish", factors, factors)
        self._finish = []


def _tables(jobs: list[_Job]) -> tuple[Tensor, Tensor, int]:
    segs: list[int] = []
    runs: list[int] = []
    numel = 0
    for index, job in enumerate(jobs):
        item, seg, state, slots = job.item, job.seg, job.item.state, job.slots
        geo = seg.geometry
        offset = seg.segment.offset * item.weight.element_size()
        if job.hp.beta1 is not None:
            moment = [state["sign"].data_ptr() + seg.bits_at, state["row_m"].data_ptr() + 4 * seg.rows_at,
                      state["col_m"].data_ptr() + 4 * seg.cols_at]
        else:
            moment = [0, 0, 0]
        segs += [geo.rows, geo.cols, item.weight.data_ptr() + offset, item.grad.data_ptr() + offset, moment[0],
                 state["row_v"].data_ptr() + 4 * seg.rows_at, state["col_v"].data_ptr() + 4 * seg.cols_at, moment[1], moment[2],
                 *slots.addresses("row_v", "col_v", "row_m", "col_m")]
        numel += add_runs(runs, index, geo)
    return int64_table(segs, FIELDS), int64_table(runs, 6), numel
