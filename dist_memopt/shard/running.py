"""Collectives a step leaves running, held until they complete and waited for at exit.

SMMF leaves its statistics all_reduce running past ``step()`` so that it overlaps the next forward
and backward. gloo's worker thread keeps a reference to a collective's tensors until it has run.
Where the optimizer (and so its reducer) is freed first, or the process exits with the collective
still running, that thread drops the last reference; freeing a tensor that Python created needs
the GIL, and during the interpreter's finalization a thread that asks for it is ended, which
aborts the process ("terminate called without an active exception"), whether or not
``destroy_process_group()`` was called.

So each collective's work and tensor are held here, not only by their reducer, until a later
step's reduction (by then the worker thread has long released them). At exit, an ``atexit`` hook
(run before finalization) waits for every one still running (:func:`wait_all`) and then keeps them
for good: the worker thread marks a collective complete, which ends the wait, a moment before it
drops its own reference, so the tensors must outlive the interpreter for that thread never to be
the one that frees them.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import warnings
from datetime import timedelta

import torch.distributed as dist
from torch import Tensor

__all__ = ["hold", "release_completed", "wait_all", "keep_for_good", "held_count", "running_count", "EXIT_WAIT"]

#: how long the interpreter's exit waits for the collectives still running
EXIT_WAIT = timedelta(seconds=60)

_held: list[tuple[dist.Work, Tensor]] = []

# a forked child (a data loader's worker) has none of the parent's collectives running, nor the
# threads that would complete them: it must not wait for them at its exit
os.register_at_fork(after_in_child=_held.clear)


def hold(work: dist.Work, tensor: Tensor) -> None:
    """Keep ``work`` and the ``tensor`` it reduces until :func:`release_completed` finds it
    complete, or until exit."""
    _held.append((work, tensor))


def release_completed() -> None:
    """Drop the held collectives that have completed (as a step starts its reduction). Should the
    worker thread still hold one for a moment, it frees it with the GIL, as any thread may before
    finalization."""
    _held[:] = [(w, t) for w, t in _held if not w.is_completed()]


def held_count() -> int:
    """How many collectives are held (running, or completed since the last release)."""
    return len(_held)


def running_count() -> int:
    """How many held collectives have not completed."""
    return sum(not w.is_completed() for w, _ in _held)


def wait_all() -> None:
    """Wait for every held collective (at most :data:`EXIT_WAIT` each; a failure is a warning),
    keeping them held. Run at exit, before the interpreter finalizes, then :func:`keep_for_good`."""
    for work, _ in _held:
        try:
            work.wait(EXIT_WAIT)
        except Exception as error:  # a peer that exited, or never posted the collective
            warnings.warn(
                f"dist_memopt: at exit, the statistics all_reduce that the optimizer's last step left "
                f"running did not complete ({error}); call optimizer.synchronize() before the "
                "process group is destroyed.",
                RuntimeWarning,
                stacklevel=1,
            )
            return


def keep_for_good() -> None:
    """Give every held work and tensor a reference that is never dropped (a leak of a few small
    objects as the process ends): the interpreter's finalization then frees none of them, and the
    worker thread's last release of a collective frees no Python object."""
    for pair in _held:
        for obj in pair:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


@atexit.register
def _at_exit() -> None:
    try:
        wait_all()
    finally:
        keep_for_good()
