"""Alada's step as fused CPU kernels: two passes over the elements (C++, ``csrc/alada.h``).

The same equations as :func:`dist_memopt.optim.alada._partial_statistics` and
:func:`~dist_memopt.optim.alada._refit_and_update`, and as the Triton kernels. The refit needs the
complete statistic before any weight can move, so :meth:`CpuAlada.statistics` (M and the partial
statistic per tile, summed in tile order) runs before the all_reduce and :meth:`CpuAlada.update`
(the float64 refit per segment, then the weights) after it.

At even t > 0 the statistic is one per row (V·q). A segment of one run (a whole tensor, or a
range: FSDP2's shard of a matrix, a ZeRO or Megatron partition) holds the statistic of each row it
holds whole, so those rows take one pass in :meth:`CpuAlada.statistics` (statistic, p's refit,
update, row by row): the same numbers, M read once instead of twice (20 bytes per fp32 element
instead of 24). The rows the range cuts (its first and last, at most two) take the statistics
there and their refit and update in :meth:`CpuAlada.update`, after the all_reduce, where the rows
other ranks hold are refit too.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from dist_memopt.kernels.jobs import AladaJob as _Job, StatSlots, alada_route
from dist_memopt.kernels.launch import KernelObserver, Reporter
from dist_memopt.kernels.cpu_build import cpu_kernels
from dist_memopt.kernels.cpu_tables import add_runs, address, batched, check_flat, dtype_code, grad_offsets, int64_table, one_run, patch_grads, rebatched, whole_row_elements

__all__ = ["CpuAlada"]

FIELDS = 10  # n, m, w, g, momentum, p, q, v0, statistic slot, ‖G0‖² slot (csrc/alada.h)
GRAD_FIELD, MOMENTUM_FIELD = 3, 4  # the momentum's is the gradient's where .grad holds M
EVEN, ODD, FIRST = 0, 1, 2


def _phase(hp: Any) -> int:
    return FIRST if hp.t == 0 else ODD if hp.t % 2 else EVEN


class CpuAlada:
    """One step's segments on CPU: :meth:`statistics` before the all_reduce, :meth:`update` after.

    Segments of one dtype and schedule make one call per phase, whatever their shapes and layouts.
    At even t > 0, segments of one run are stepped in one pass by :meth:`statistics` (but the
    rows they cut).
    """

    def __init__(self, observer: Optional[KernelObserver] = None) -> None:
        self._report = Reporter(observer, "cpu.")
        self._jobs: list[_Job] = []  # two passes, the statistics completed in between
        self._one_run_jobs: list[_Job] = []  # one pass
        # (dtype, schedule, jobs, segments, runs, elements) per kernel call, built by prepare()
        self._two_pass: list[tuple[Any, Any, list[_Job], Tensor, Tensor, int]] = []
        self._one_pass: list[tuple[Any, Any, list[_Job], Tensor, Tensor, int]] = []
        self._batches: list[tuple[Any, Any, Tensor, Tensor, int, int]] = []
        # (dtype, schedule, segments, runs, elements in rows a range cuts) with rows not held whole
        self._rest: list[tuple[Any, Any, Tensor, Tensor, int]] = []

    def add(self, item: Any, seg: Any, hp: Any, slots: StatSlots) -> None:
        check_flat(item.name, item.weight, item.grad)
        one_pass = _phase(hp) == EVEN and one_run(seg.geometry)
        (self._one_run_jobs if one_pass else self._jobs).append(_Job(item, seg, hp, slots))

    def prepare(self) -> None:
        """The kernel tables of the segments added so far (reads addresses, changes nothing: the
        step builds them while the finite check runs)."""
        self._one_pass += [(dtype, hp, jobs, *_tables(jobs)) for (dtype, hp), jobs in batched(self._one_run_jobs).items()]
        self._two_pass += [(dtype, hp, jobs, *_tables(jobs)) for (dtype, hp), jobs in batched(self._jobs).items()]
        self._one_run_jobs, self._jobs = [], []

    def route(self, schedules: list[Any]) -> Any:
        """The phases of the schedules (:func:`~dist_memopt.kernels.jobs.alada_route`)."""
        return alada_route(schedules)

    def prepared(self) -> tuple[list[tuple], list[tuple]]:
        """The tables :meth:`prepare` built, for :meth:`reuse` at a later step of the same segments
        and phases."""
        def keep(batches: list[tuple]) -> list[tuple]:
            return [(dtype, hp, jobs, segs, runs, numel, grad_offsets(jobs)) for dtype, hp, jobs, segs, runs, numel in batches]

        return keep(self._one_pass), keep(self._two_pass)

    def reuse(self, prepared: tuple[list[tuple], list[tuple]], schedule_of: dict[int, Any]) -> bool:
        """Take :meth:`prepared` tables again, with this step's gradient addresses (and momentum's,
        where ``.grad`` holds it) and schedules; False, with nothing taken, where a batch's
        segments no longer share one schedule."""
        one_pass, two_pass = (rebatched(p, schedule_of) for p in prepared)
        if one_pass is None or two_pass is None:
            return False
        for batches, into in ((one_pass, self._one_pass), (two_pass, self._two_pass)):
            for dtype, hp, jobs, segs, runs, numel, offsets in batches:
                patch_grads(segs, jobs, offsets, (GRAD_FIELD, MOMENTUM_FIELD) if hp.in_grad else (GRAD_FIELD,))
                into.append((dtype, hp, jobs, segs, runs, numel))
        return True

    def statistics(self) -> None:
        """M and the partial statistics, summed in tile order into the reducer's slots (and the
        one-pass steps of segments of one run, whose statistics the slots then hold too)."""
        self.prepare()
        self._step_one_pass()
        kernels = cpu_kernels() if self._two_pass else None
        for dtype, hp, jobs, segs, runs, numel in self._two_pass:
            if self._report.executing:
                partials = kernels.alada_stats(segs, runs, dtype_code(dtype), _phase(hp), hp.in_grad, hp.beta1, hp.bias1, _g0_div(hp))
            else:
                rows, cols, tiles = kernels.tile_partials(segs, runs, 1)
                partials = (cols if _phase(hp) == ODD else rows) + (tiles if _phase(hp) == FIRST else 0)
            momentum = 0 if hp.in_grad else numel * 4
            factors = _factor_bytes(jobs)
            # tile partials: written, then read once more when summed in tile order
            self._report.record("alada_stats", numel * dtype.itemsize + momentum + factors + 4 * partials, momentum + 4 * partials)
            self._batches.append((dtype, hp, segs, runs, numel, factors))
        self._two_pass = []

    def update(self) -> None:
        """After the all_reduce: refit every segment's p or q (float64), then update the weights."""
        kernels = cpu_kernels() if self._batches or self._rest else None
        for dtype, hp, segs, runs, cut in self._rest:
            if self._report.executing:
                kernels.alada_refit_rest(segs, runs, hp.beta2, hp.eps)
            self._report.record("alada_refit_rest", 0, 0)  # O(rows) float64, no element
            if cut:  # at most two rows per segment: W and M read, W written
                if self._report.executing:
                    kernels.alada_update_cut_rows(segs, runs, dtype_code(dtype), hp.in_grad, hp.lr, hp.eps, hp.bias1, hp.bias2,
                                                  *hp.start_decays, _decay(hp))
                size = dtype.itemsize
                self._report.record("alada_update_cut_rows", cut * (size + (size if hp.in_grad else 4)), cut * size)
        self._rest = []
        for dtype, hp, segs, runs, numel, factors in self._batches:
            if self._report.executing:
                kernels.alada_refit(segs, _phase(hp), hp.beta2, hp.eps)
                kernels.alada_update(segs, runs, dtype_code(dtype), hp.in_grad, hp.lr, hp.eps, hp.bias1, hp.bias2,
                                     *hp.start_decays, _decay(hp))
            size = dtype.itemsize
            momentum = size if hp.in_grad else 4
            # p, q (float64): read and written by the refit, read by the update
            self._report.record("alada_update", numel * (size + momentum) + 2 * factors, numel * size + factors)
        self._batches = []

    def _step_one_pass(self) -> None:
        """Even t, segments of one run: per row held whole, V·q, p's refit and the update while the
        row is in L1; the statistics of the rows the range cuts."""
        kernels = cpu_kernels() if self._one_pass else None
        for dtype, hp, jobs, segs, runs, numel in self._one_pass:
            if self._report.executing:
                kernels.alada_even_rows(segs, runs, dtype_code(dtype), hp.in_grad, hp.beta1, hp.bias1, hp.beta2, hp.lr, hp.eps,
                                        hp.bias2, *hp.start_decays, _decay(hp))
            size, momentum = dtype.itemsize, 0 if hp.in_grad else numel * 4
            # G, M read and M written once, W of the rows held whole read and written; p read and
            # written, q read
            factors = _factor_bytes(jobs)
            whole = sum(whole_row_elements(j.seg.geometry) for j in jobs)
            self._report.record("alada_even_rows", (numel + whole) * size + momentum + factors, whole * size + momentum + factors)
            if whole < sum(j.seg.geometry.rows * j.seg.geometry.cols for j in jobs):  # some rows are not held whole
                self._rest.append((dtype, hp, segs, runs, numel - whole))
        self._one_pass = []


def _g0_div(hp: Any) -> float:
    """What G0 is recovered from: M_1 = (1 − β1)·G0 where .grad holds M."""
    return (1.0 - hp.beta1) if hp.in_grad else 1.0


def _decay(hp: Any) -> float:
    return 1.0 - hp.lr * hp.weight_decay


def _factor_bytes(jobs: list[_Job]) -> int:
    return sum(j.seg.geometry.rows + j.seg.geometry.cols for j in jobs) * 8  # p, q (float64)


def _tables(jobs: list[_Job]) -> tuple[Tensor, Tensor, int]:
    segs: list[int] = []
    runs: list[int] = []
    numel = 0
    for index, job in enumerate(jobs):
        item, seg, state = job.item, job.seg, job.item.state
        geo = seg.geometry
        offset = seg.segment.offset
        grad = address(item.grad, offset)
        momentum = grad if job.hp.in_grad else address(state["exp_avg"], seg.elems_at)
        segs += [geo.rows, geo.cols, address(item.weight, offset), grad, momentum, address(state["row"], seg.rows_at),
                 address(state["col"], seg.cols_at), address(state["v0"], seg.factor_index), *job.slots.addresses(job.stat_name, "norm")]
        numel += add_runs(runs, index, geo)
    return int64_table(segs, FIELDS), int64_table(runs, 6), numel
