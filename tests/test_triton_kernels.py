"""What is particular to the fused Triton kernels: the index math a batch compiles (contiguous,
strided by a carry, divided). The checks both kernel families share, run here through Triton's
interpreter (``TRITON_INTERPRET=1`` from tests/conftest.py), are in test_fused_kernels.py.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

from dist_memopt.shard.runs import RunsGeometry
from dist_memopt.shard.spec import Run

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it unless the environment says otherwise
    pytest.skip("TRITON_INTERPRET is not 1 in this environment", allow_module_level=True)

def test_only_runs_of_several_pieces_compile_strided_index_math_and_only_narrow_strides_divide():
    """Strided index math for TP-style pieces only: a flat FSDP/ZeRO range and a run group of single
    pieces take the contiguous one; a stride narrower than a column block (a piece's columns may
    then wrap several times in one block) takes the per-element 64-bit division."""
    from dist_memopt.shard.geometry import RangeGeometry
    from dist_memopt.kernels.tiles import CONTIGUOUS, DIVIDED, STRIDED, index_math

    assert index_math([RangeGeometry(10, 6, 7, 43)], 16) == {"RUNS": CONTIGUOUS}
    assert index_math([RunsGeometry(10, 6, (Run(4, 30),), 0, 30)], 16) == {"RUNS": CONTIGUOUS}
    wide = RunsGeometry(10, 40, (Run(8, 16, 40, 10),), 0, 160)
    assert index_math([RangeGeometry(10, 40, 0, 400), wide], 32) == {"RUNS": STRIDED}  # one strided segment: the batch's math
    assert index_math([wide], 41) == {"RUNS": DIVIDED}
    narrow = RunsGeometry(10, 6, (Run(0, 2, 6, 10),), 0, 20)
    assert index_math([wide, narrow], 16) == {"RUNS": DIVIDED}


