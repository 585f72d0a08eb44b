"""Where Triton launches report themselves, so a step's cost can be counted without a GPU.

Each launcher calls :func:`record` with the kernel's name and the bytes its loads and stores
move (worked out from the elements it touches, per kernel); subscribers such as
:class:`dist_memopt.bench.counting.StepCost` add them up. With no subscriber it costs a call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["record", "subscribe", "unsubscribe", "executing", "count_only", "compiling", "runs_nothing", "OPTIONS"]

Listener = Callable[[str, int, int], None]
_LISTENERS: list[Listener] = []
_SKIP = [False]
_COMPILING = [False]

#: passed to every launch: Triton 3.9 warns that its default for FMA contraction changes in 3.10;
#: the kernels keep it on, so their numerics on a GPU do not follow a change of that default
OPTIONS = {"enable_fp_fusion": True}


def executing() -> bool:
    """False inside :func:`count_only`: launchers record their launches but do not run them."""
    return not _SKIP[0]


@contextmanager
def count_only() -> Iterator[None]:
    """Record launches without running them, for counting a big model's step where the kernels can
    only be interpreted (slowly): which kernels launch and what they touch does not depend on the
    values, so the counts are those of a real step. The step's results are then meaningless."""
    _SKIP[0] = True
    try:
        yield
    finally:
        _SKIP[0] = False


@contextmanager
def compiling() -> Iterator[None]:
    """Launches go into Triton's compiler and run nothing (set by
    :func:`dist_memopt.kernels.compile.compile_for`, which does the compiling)."""
    _COMPILING[0] = True
    try:
        yield
    finally:
        _COMPILING[0] = False


def runs_nothing() -> bool:
    """True while launches are only counted or only compiled: CPU tensors need no interpreter then."""
    return _SKIP[0] or _COMPILING[0]


def record(name: str, bytes_read: int, bytes_written: int) -> None:
    """One launch of kernel ``name`` reading and writing these many bytes."""
    for listener in _LISTENERS:
        listener(name, bytes_read, bytes_written)


def subscribe(listener: Listener) -> None:
    _LISTENERS.append(listener)


def unsubscribe(listener: Listener) -> None:
    _LISTENERS.remove(listener)
