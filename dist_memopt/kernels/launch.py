"""How kernel runners report their launches to an observer, and the options every Triton launch takes.

A *kernel runner* is the object one step builds for the segments a fused kernel steps
(:class:`~dist_memopt.kernels.smmf_triton.FusedSMMF`, :class:`~dist_memopt.kernels.alada_triton.FusedAlada`,
or any other runner with an ``add()``/``run()``/``finish()`` style interface). The torch path's
cost can be read from the aten ops it dispatches; a fused kernel's cannot, so each runner says
what it launches.

The observer API, for any runner (Triton, a C++ extension, ...):

* the runner's constructor takes ``observer: Optional[KernelObserver] = None`` and wraps it in a
  :class:`Reporter`;
* for each kernel launch it calls ``reporter.record(name, bytes_read, bytes_written)``: the
  kernel's name (its family first, e.g. ``"triton.smmf_tiles"``) and the bytes its loads and stores
  move, worked out from the elements it touches;
* it launches only when ``reporter.executing`` is true.

An observer is any object with an ``execute`` attribute and a ``record`` method
(:class:`KernelObserver`). It is passed in explicitly: a benchmark sets
``optimizer.kernel_observer`` (:class:`dist_memopt.bench.counting.StepCost` does, for the
optimizers it is given), the optimizer hands it to the runners it builds. With ``execute``
False the runners report and launch nothing: a dry run that counts a large model's step where the
kernels could only be interpreted, slowly; which kernels launch and what they touch does not
depend on the values, so the counts are those of a real step, and the step's results are
meaningless. Nothing else changes: which implementation steps a parameter is decided the same way
with or without an observer. Without one, reporting costs an attribute test.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

__all__ = ["KernelObserver", "Reporter", "OPTIONS"]

#: passed to every Triton launch: Triton 3.9 warns that its default for FMA contraction changes in
#: 3.10; the kernels keep it on, so their numerics on a GPU do not follow a change of that default
OPTIONS = {"enable_fp_fusion": True}


@runtime_checkable
class KernelObserver(Protocol):
    """Receives every kernel launch of the runners it is passed to."""

    #: False: runners report their launches without launching them (a dry run)
    execute: bool

    def record(self, name: str, bytes_read: int, bytes_written: int) -> None:
        """One launch of kernel ``name``, reading and writing these many bytes of memory."""


class Reporter:
    """A runner's side of the API: reports to its observer, if any, under a family prefix."""

    __slots__ = ("observer", "prefix")

    def __init__(self, observer: Optional[KernelObserver], prefix: str) -> None:
        self.observer = observer
        self.prefix = prefix

    @property
    def executing(self) -> bool:
        """Whether to launch: always, unless the observer asks for a dry run."""
        return self.observer is None or self.observer.execute

    def record(self, name: str, bytes_read: int, bytes_written: int) -> None:
        if self.observer is not None:
            self.observer.record(self.prefix + name, bytes_read, bytes_written)
