"""The fused kernels compiled for a GPU (sm_90, as the H200 the GPU check runs on), here on CPU.

The interpreter tests (test_triton_kernels.py) run the kernels' equations; this compiles every
specialisation a step launches, through Triton's real pipeline down to a cubin, the way a CUDA
run would: the interpreter accepted an ``if`` on a runtime value whose branches gave one name
tensors of different shapes, which the compiler rejects. Also pinned from the compiled code: no
float atomics (their order varies: reruns must be bit-identical), SMMF's sign bits flipped by a
relaxed integer xor (a strong one fenced and invalidated L1 around every element), no register
spills, and what each element costs in the main loops' instructions (static SASS counts: no
64-bit division, neither for contiguous runs nor for a TP block's strided ones; no fences). ``python -m tools.compile_kernels`` (a
development tool outside the wheel) is the command; it needs TRITON_INTERPRET unset, so it runs in a subprocess (conftest.py sets it here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")

from tools.kernel_compile import compile_for  # noqa: E402

KERNELS = {"_tile_kernel", "_reduce_kernel", "_finish_kernel", "_stats_kernel", "_refit_kernel", "_update_kernel"}
ELEMENT_KERNELS = ("_tile_kernel", "_stats_kernel", "_update_kernel")
#: their variants for a tensor-parallel shard's strided runs (the tool's column block), rows of their own
STRIDED = {f"{kernel} (TP runs)" for kernel in ELEMENT_KERNELS}


def test_every_kernel_compiles_for_sm90_without_spills_or_float_atomics(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tools.compile_kernels", "--models", "awkward", "--archs", "90",
               "--compile-dtypes", "float32,bfloat16", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())["benchmarks"]["compile"]
    summary = result["archs"]["awkward/sm_90"]
    assert set(summary) == KERNELS | STRIDED  # SMMF's three and Alada's four launch sites, all reached
    for kernel, s in summary.items():
        assert s["errors"] == [], kernel
        assert s["float_atomics"] == [], kernel
        assert s["max_local_bytes"] == 0, f"{kernel} spills {s['max_local_bytes']} bytes per thread"
        assert 0 < s["max_registers"] <= 255, kernel
    # Triton 3.6 writes an atom whose result goes unused (ptxas issues it as a RED all the same)
    assert summary["_tile_kernel"]["atomics"] in (["red.global.gpu.relaxed.xor.b32"], ["atom.global.gpu.relaxed.xor.b32"])
    assert summary["_tile_kernel (TP runs)"]["atomics"] == summary["_tile_kernel"]["atomics"]
    assert all(not s["atomics"] for k, s in summary.items() if not k.startswith("_tile_kernel"))
    # no value or alignment specialisation: variants are dtypes x constexpr settings x two block shapes
    assert summary["_tile_kernel"]["specializations"] == 2 * 3 * 2  # fp32/bf16; HAS_M, COUPLED; 16/32 columns
    assert all(v["ok"] for v in result["verdicts"]) and len(result["verdicts"]) == 4
    for kernel in ELEMENT_KERNELS:
        assert summary[kernel]["max_loop_calls"] == 0 and summary[kernel]["max_loop_fences"] == 0, kernel
        strided = summary[f"{kernel} (TP runs)"]
        assert strided["max_loop_calls"] == 0 and strided["max_loop_fences"] == 0, kernel  # no division: a carry
    # measured 85.5, 33.0, 41.0 (Triton 3.6: 89.5, 33.0, 41.0); before (a 64-bit division per element,
    # and three fences around each strong atomic in the tile): 229.2, 169.8, 152.5
    assert summary["_tile_kernel"]["max_loop_instructions_per_element"] <= 90
    assert summary["_stats_kernel"]["max_loop_instructions_per_element"] <= 38
    assert summary["_update_kernel"]["max_loop_instructions_per_element"] <= 43
    # strided runs (a tensor-parallel column block): measured 106.8, 53.5, 62.0 (Triton 3.6 too); with
    # 64-bit piece checks, 119.2, 64.0, 71.0; with a 64-bit division per element (4 subroutine calls a
    # trip): 195.0, 142.2, 149.8
    assert summary["_tile_kernel (TP runs)"]["max_loop_instructions_per_element"] <= 110
    assert summary["_stats_kernel (TP runs)"]["max_loop_instructions_per_element"] <= 57
    assert summary["_update_kernel (TP runs)"]["max_loop_instructions_per_element"] <= 65
    assert summary["_tile_kernel (TP runs)"]["min_resident_warps"] >= 16
    # 32-column blocks: two tile programs per SM (16 warps, 98 registers), four of Alada's (32 warps);
    # 64-column blocks took 185 registers in the tile, one program of 8 warps
    assert summary["_tile_kernel"]["min_resident_warps"] >= 16
    assert summary["_stats_kernel"]["min_resident_warps"] >= 32 and summary["_update_kernel"]["min_resident_warps"] >= 32


def test_compile_for_refuses_interpreted_kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels were imported compiled here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        with compile_for(90):
            pass


def _sass(*lines: str) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))


def test_main_loop_counts_subroutines_per_call_and_not_the_predicated_exit():
    """On a hand-written listing: the longest backward branch is the loop; a CALL into code ending
    in RET (64-bit division) adds its body per call; ptxas's CALL.REL.NOINC into the exit path
    (ending in EXIT) is a branch, not a call; MEMBAR and CCTL count as fences."""
    from tools.kernel_compile import main_loop, resident_warps

    sass = _sass(
        "MOV R1, c[0x0][0x28]",  # 0x00
        "IMAD R2, R3, R4, RZ",  # 0x10: the loop starts
        "CALL.REL.NOINC 0x80",  # 0x20: a subroutine of 2 instructions
        "MEMBAR.ALL.GPU",  # 0x30
        "CCTL.IVALL",  # 0x40
        "@P0 CALL.REL.NOINC 0x70",  # 0x50: the predicated exit
        "@!P1 BRA 0x10",  # 0x60: back to the loop's start
        "EXIT",  # 0x70
        "IADD3 R5, R5, 0x1, RZ",  # 0x80: the subroutine
        "RET.REL.NODEC R30 0x0",  # 0x90
    )
    loop = main_loop(sass)
    assert (loop.instructions, loop.calls, loop.fences) == (6 + 2, 1, 2)
    assert main_loop(_sass("MOV R1, R2", "EXIT")) is None
    # registers allotted per warp in 256s: 188 -> 6,144 per warp, 8 warps -> one program of 8 warps
    assert resident_warps(188, 8, 1024, 90) == 8 and resident_warps(32, 4, 16, 90) == 64 and resident_warps(128, 8, 1024, 90) == 16
