"""Where Triton launches report themselves, so a step's cost can be counted without a GPU.

Each launcher calls :func:`record` with the kernel's name and the bytes its loads and stores
move (worked out from the elements it touches, per kernel); subscribers such as
:class:`dist_memopt.bench.counting.StepCost` add them up. With no subscriber it costs a call.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["record", "subscribe", "unsubscribe"]

Listener = Callable[[str, int, int], None]
_LISTENERS: list[Listener] = []


def record(name: str, bytes_read: int, bytes_written: int) -> None:
    """One launch of kernel ``name`` reading and writing these many bytes."""
    for listener in _LISTENERS:
        listener(name, bytes_read, bytes_written)


def subscribe(listener: Listener) -> None:
    _LISTENERS.append(listener)


def unsubscribe(listener: Listener) -> None:
    _LISTENERS.remove(listener)
