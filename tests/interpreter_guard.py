"""Bounds checks for the fused kernels while Triton's interpreter runs them on CPU tensors.

On a GPU a kernel that strays outside its tensors faults (an illegal address) or silently corrupts
a neighbour; the interpreter reads and writes the raw addresses without a check, so on CPU the same
bug corrupts the process's heap, maybe much later. With the guard installed every load, store and
atomic of an interpreted kernel must fall inside a tensor the kernel was given: one passed as an
argument, or one addressed as an offset from such an argument (the kernels reach a batch's tensors
through :class:`~dist_memopt.kernels.tiles.Offsets` and
:class:`~dist_memopt.kernels.tiles.BitOffsets`, which the guard watches). A tensor's span is its
extent (first to last element, strides included); sign bytes widen to the aligned 4-byte words the
kernels load and xor. Spans live as long as their storage. A stray access raises, naming the kernel.

Written against Triton 3.9's interpreter (the test extra pins it).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Optional

import numpy as np
import torch

_SPANS: dict[int, tuple[Any, set[tuple[int, int]]]] = {}  # id(storage) -> (weakref, spans)
_MERGED: list[Optional[tuple[np.ndarray, np.ndarray]]] = [None]
_KERNEL = ["?"]
_INSTALLED = [False]


class OutOfBounds(RuntimeError):
    pass


def _forget(key: int, _ref: Any = None) -> None:
    _SPANS.pop(key, None)
    _MERGED[0] = None


def allow(t: Optional[torch.Tensor], word: int = 1) -> None:
    """Let kernels touch ``t``'s elements (widened to aligned ``word``-byte words) while it lives."""
    if t is None or t.device.type != "cpu" or t.numel() == 0:
        return
    lo = t.data_ptr()
    hi = lo + (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()
    lo, hi = lo - lo % word, hi + (-hi) % word
    storage = t.untyped_storage()
    key = id(storage)
    if key not in _SPANS:
        _SPANS[key] = (weakref.ref(storage, functools.partial(_forget, key)), set())
    spans = _SPANS[key][1]
    if (lo, hi) not in spans:
        spans.add((lo, hi))
        _MERGED[0] = None


def _merged() -> tuple[np.ndarray, np.ndarray]:
    """The allowed spans as sorted, disjoint [start, end) arrays."""
    if _MERGED[0] is None:
        starts: list[int] = []
        ends: list[int] = []
        for lo, hi in sorted(span for _, spans in _SPANS.values() for span in spans):
            if starts and lo <= ends[-1]:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        _MERGED[0] = (np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64))
    return _MERGED[0]


def check(pointers: np.ndarray, mask: Optional[np.ndarray], nbytes: int, access: str) -> None:
    """Raise unless every active pointer's ``nbytes`` lie in one allowed span."""
    active = pointers if mask is None else pointers[np.broadcast_to(mask, pointers.shape)]
    active = active.astype(np.uint64).ravel()
    if active.size == 0:
        return
    starts, ends = _merged()
    at = np.searchsorted(starts, active, side="right").astype(np.int64) - 1
    inside = (at >= 0) & (active + np.uint64(nbytes) <= ends[np.maximum(at, 0)]) if starts.size else np.zeros(active.shape, bool)
    if not inside.all():
        stray = active[~inside]
        raise OutOfBounds(
            f"kernel {_KERNEL[0]}: {access} of {nbytes} bytes at {stray.size} address(es) outside its tensors, "
            f"first {hex(int(stray[0]))} (allowed spans: {len(starts)})"
        )


def _element_bytes(handle: Any) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


def install() -> None:
    """Patch the interpreter (idempotent); a no-op without Triton."""
    if _INSTALLED[0]:
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    _INSTALLED[0] = True
    from dist_memopt.kernels import tiles

    for cls in (tiles.Offsets, tiles.BitOffsets):
        cls.__call__ = _watching(cls.__call__, 4 if cls is tiles.BitOffsets else 1)

    init_args = interpreter.GridExecutor._init_args_hst

    def init_args_allowed(self: Any, args_dev: Any, kwargs: dict) -> Any:
        _KERNEL[0] = getattr(self.fn, "__name__", "?")
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        for name, arg in zip(self.arg_names, args_hst):
            if isinstance(arg, torch.Tensor):
                if arg.data_ptr() == 0:  # an empty tensor: offsets from it would be absolute addresses
                    raise OutOfBounds(f"kernel {_KERNEL[0]}: argument {name} has no address (an empty tensor)")
                allow(arg)
        return args_hst, kwargs_hst

    interpreter.GridExecutor._init_args_hst = init_args_allowed
    builder = interpreter.InterpreterBuilder
    load, store, rmw, cas = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw, builder.create_atomic_cas

    def masked_load(self: Any, ptrs: Any, mask: Any, *rest: Any) -> Any:
        check(ptrs.data, mask.data, _element_bytes(ptrs), "load")
        return load(self, ptrs, mask, *rest)

    def masked_store(self: Any, ptrs: Any, value: Any, mask: Any, *rest: Any) -> Any:
        check(ptrs.data, mask.data, _element_bytes(ptrs), "store")
        return store(self, ptrs, value, mask, *rest)

    def atomic_rmw(self: Any, op: Any, ptr: Any, val: Any, mask: Any, *rest: Any) -> Any:
        check(ptr.data, mask.data, _element_bytes(ptr), "atomic")
        return rmw(self, op, ptr, val, mask, *rest)

    def atomic_cas(self: Any, ptr: Any, *rest: Any) -> Any:
        check(ptr.data, None, _element_bytes(ptr), "atomic")
        return cas(self, ptr, *rest)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas


def _watching(call: Any, word: int) -> Any:
    @functools.wraps(call)
    def addressed(self: Any, t: Optional[torch.Tensor]) -> int:
        allow(t, word)
        return call(self, t)

    return addressed
