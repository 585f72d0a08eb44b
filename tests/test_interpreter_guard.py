"""The interpreter's bounds checks (tests/interpreter_guard.py): a kernel that strays outside its
tensors is stopped on CPU, as it would fault or corrupt memory on a GPU; legal accesses, including
tensors reached as offsets from another argument, pass; and the checks are on in the ranks too."""

from __future__ import annotations

import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET is not 1 in this environment", allow_module_level=True)

import triton.language as tl  # noqa: E402

import interpreter_guard  # noqa: E402
from dist_memopt.kernels.tiles import Offsets  # noqa: E402


@triton.jit
def _copy(SRC, DST, src_off, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(DST + i, tl.load(SRC + src_off + i, mask=i < n), mask=i < n)


@triton.jit
def _xor_words(WORDS, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.atomic_xor(WORDS + i, tl.full((BLOCK,), 1, tl.int32), mask=i < n, sem="relaxed")


def test_in_bounds_accesses_pass():
    src, dst = torch.arange(8.0), torch.zeros(8)
    _copy[(1,)](src, dst, 0, 8, BLOCK=16)  # lanes past n are masked off: not accesses
    assert torch.equal(dst, src)


def test_a_load_past_the_end_is_stopped():
    src, dst = torch.arange(8.0), torch.zeros(9)
    with pytest.raises(Exception, match="kernel _copy: load of 4 bytes at 1 address"):
        _copy[(1,)](src, dst, 0, 9, BLOCK=16)


def test_a_tensor_reached_as_an_offset_is_allowed_only_once_addressed():
    """The fused kernels reach a batch's tensors as offsets from one argument (tiles.Offsets)."""
    base, other, dst = torch.zeros(4), torch.arange(5.0) + 1, torch.zeros(5)
    offset = (other.data_ptr() - base.data_ptr()) // 4
    with pytest.raises(Exception, match="kernel _copy: load"):
        _copy[(1,)](base, dst, offset, 5, BLOCK=8)
    assert Offsets(base)(other) == offset  # what the kernels' launchers call for every such tensor
    _copy[(1,)](base, dst, offset, 5, BLOCK=8)
    assert torch.equal(dst, other)


def test_a_stray_atomic_is_stopped():
    words = torch.zeros(3, dtype=torch.int32)
    _xor_words[(1,)](words, 3, BLOCK=4)
    with pytest.raises(Exception, match="kernel _xor_words: atomic of 4 bytes"):
        _xor_words[(1,)](words, 4, BLOCK=4)


def test_spans_end_with_their_storage():
    t = torch.zeros(5)
    interpreter_guard.allow(t)
    spans = len(interpreter_guard._SPANS)
    del t
    assert len(interpreter_guard._SPANS) == spans - 1


def _guard_installed(rank: int, world_size: int) -> bool:
    import interpreter_guard

    return interpreter_guard._INSTALLED[0]


def test_the_ranks_check_their_kernels_too():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
    from harness import run_distributed

    assert run_distributed(_guard_installed, 2) == [True, True]
