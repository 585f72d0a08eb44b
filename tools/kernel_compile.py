"""Compile the fused kernels for a GPU on a machine without one, exactly as a real step launches them.

A development tool (not part of the wheel): it reads Triton internals (its active driver and
``jit_cache_hook``, as in triton 3.9) and disassembles with the ``cuobjdump`` in Triton's wheel.

Triton's interpreter (how CI runs the kernels on CPU) accepts programs its compiler rejects: an
``if`` on a runtime value whose branches give one name tensors of different shapes ran there and
failed to compile. Inside :func:`compile_for`, every Triton launch of a step on CPU tensors is
compiled for ``sm_<arch>`` instead of run (Triton's own pipeline down to a cubin through the
``ptxas`` in its wheel; no driver, no device) with the signature, specialisations and options the
launch would have on that GPU. The step's results are then meaningless. Each :class:`Compiled` kernel says what a GPU
would run: its registers and local memory (spills), its shared memory, and its atomics (none on
floats: their order varies, and the kernels promise bit-identical reruns).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional
from unittest import mock

import torch

__all__ = ["Compiled", "compile_for"]

_OPTIONS = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "launch_cooperative_grid", "maxnreg")
_ATOMIC = re.compile(r"\b(?:atom|red)\.[\w.]+")
_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);", re.MULTILINE)
_FENCES = ("MEMBAR", "CCTL", "ERRBAR")  # a memory barrier, an L1 invalidation: what a strong atomic costs
_FLOAT_TYPE = re.compile(r"\.(?:f16|bf16|f32|f64)(?:x2)?$")


@dataclass
class Compiled:
    """One specialisation of one kernel, compiled (``error`` set instead when it did not compile)."""

    kernel: str
    signature: str  # Triton's own rendering of the launch: options and argument types
    arch: int
    constants: dict[str, Any] = field(default_factory=dict)  # constexpr and specialised (== 1) arguments
    seconds: float = 0.0
    error: Optional[str] = None
    ptx: str = ""
    cubin: bytes = b""
    shared_bytes: int = 0
    num_warps: int = 0
    resources: dict[str, int] = field(default_factory=dict)  # REG, LOCAL, STACK from cuobjdump
    sass: str = ""  # the cubin disassembled (cuobjdump -sass), after its resource usage

    @property
    def atomics(self) -> list[str]:
        """The PTX atomic (``atom``) and reduction (``red``) instructions, e.g. ``red.global.gpu.relaxed.xor.b32``."""
        return sorted(set(_ATOMIC.findall(self.ptx)))

    @property
    def float_atomics(self) -> list[str]:
        return [a for a in self.atomics if _FLOAT_TYPE.search(a)]

    @property
    def fp64_instructions(self) -> int:
        """Static count of PTX instructions on float64 (slow on consumer GPUs; Alada's refit uses them)."""
        return sum(1 for line in self.ptx.splitlines() if ".f64" in line and not line.lstrip().startswith("//"))


@dataclass
class Loop:
    """A kernel's main loop in SASS (its longest backward branch), what each trip issues per thread."""

    instructions: int  # the body, plus a called subroutine's body once per call (64-bit division is one)
    calls: int
    fences: int  # MEMBAR, ERRBAR and CCTL (an L1 invalidation) instructions in the body


def _target(operands: str) -> Optional[int]:
    """The address a SASS branch or call goes to."""
    found = re.search(r"0x([0-9a-f]+)", operands)
    return int(found.group(1), 16) if found else None


def main_loop(sass: str) -> Optional[Loop]:
    """The longest loop of a disassembled kernel (None for straight-line code): static counts, an
    estimate of what each trip issues per thread where timings cannot be had."""
    code = [(int(address, 16), opcode, rest) for address, opcode, rest in _SASS_LINE.findall(sass)]
    spans = [(target, a) for a, op, rest in code if op.startswith("BRA") for target in [_target(rest)] if target is not None and target < a]
    if not spans:
        return None
    low, high = max(spans, key=lambda span: span[1] - span[0])
    body = [(a, op, rest) for a, op, rest in code if low <= a <= high]
    instructions, calls = len(body), 0
    for target in (_target(rest) for _, op, rest in body if op.startswith("CALL")):
        callee = [op for a, op, _ in code if target is not None and a >= target]
        end = next((i for i, op in enumerate(callee) if op.startswith(("RET", "EXIT"))), None)
        if end is not None and callee[end].startswith("RET"):  # a subroutine (64-bit division is one)
            instructions, calls = instructions + end + 1, calls + 1
        # a CALL.REL.NOINC into code that ends in EXIT is ptxas's predicated exit from the loop
    fences = sum(1 for _, op, _ in body if op.startswith(_FENCES))
    return Loop(instructions, calls, fences)


#: per SM: registers, shared bytes, resident warps and programs (CUDA's occupancy limits)
_SM_LIMITS = {80: (65536, 164 * 1024, 64, 32), 90: (65536, 228 * 1024, 64, 32)}


def resident_warps(registers: int, warps: int, shared_bytes: int, arch: int) -> Optional[int]:
    """Warps of one kernel an SM holds at once (registers are allotted per warp in 256s); None for
    an architecture whose limits are not listed here (its kernels still compile)."""
    if arch not in _SM_LIMITS:
        return None
    total_registers, total_shared, max_warps, max_programs = _SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    programs = min(total_registers // (per_warp * warps), max_programs, max_warps // warps)
    if shared_bytes:
        programs = min(programs, total_shared // (shared_bytes + 1024))  # 1 KiB reserved per program
    return programs * warps


class _CompileOnlyDriver:
    """What Triton's launcher asks of the active driver before compiling: a device, a stream, a target."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _cuobjdump(cubin: bytes) -> str:
    """The cubin's resource usage and SASS, as the ``cuobjdump`` in Triton's wheel prints them ("" without one).

    About 0.8 s a cubin however small, so each listing is kept beside Triton's own cache, named by
    the cubin's and the tool's hash: a second run of the same kernels disassembles nothing."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    if not tool or not os.path.exists(tool):
        return ""
    folder = os.path.join(knobs.cache.dir, "dist_memopt_sass")
    kept = os.path.join(folder, hashlib.sha256(cubin + tool.encode()).hexdigest() + ".txt")
    if os.path.exists(kept):
        with open(kept) as file:
            return file.read()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        dump = subprocess.run([tool, "--dump-resource-usage", "-sass", file.name], capture_output=True, text=True, check=False).stdout
    if dump:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as file:
            file.write(dump)
        os.replace(file.name, kept)  # whole or not at all, were two runs to race
    return dump


def _disassemble(records: list[Compiled]) -> None:
    """SASS and resources of every compiled record, the disassembler run on all cores at once."""
    todo = [record for record in records if record.cubin and not record.sass]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for record, dump in zip(todo, pool.map(_cuobjdump, [record.cubin for record in todo])):
            record.sass, record.resources = dump, _resources(dump)


def _resources(dump: str) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the cubin's one kernel."""
    line = re.search(r"Function [^\n]*:\s*\n\s*(REG:.*)", dump)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line.group(1))} if line else {}


def _interpreted() -> bool:
    from dist_memopt.kernels import tiles

    return type(tiles.tile_elements).__name__ == "InterpretedFunction"


@contextmanager
def compile_for(arch: int = 90) -> Iterator[list[Compiled]]:
    """Within: Triton launches on CPU tensors compile for CUDA ``sm_<arch>`` and do not run.

    Yields the list that collects one :class:`Compiled` per distinct specialisation (a compile
    error is recorded, not raised, so one run reports every kernel). Needs ``TRITON_INTERPRET``
    unset when Triton was imported: interpreted kernels have nothing to compile.
    """
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.driver import driver

    if _interpreted():
        raise RuntimeError("compile_for compiles the kernels: run it with TRITON_INTERPRET unset "
                           "(the kernels were imported for Triton's interpreter)")
    stand_in = _CompileOnlyDriver(arch)
    records: list[Compiled] = []
    seen: set[str] = set()
    functions: dict[int, Any] = {}  # the launched kernels, by id

    def compile_instead(*, key: Any, repr: str, fn: Any, compile: dict, **_: Any) -> bool:
        functions[id(fn.jit_function)] = fn.jit_function
        if str(key) not in seen:
            seen.add(str(key))
            source = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
            options = json.loads(compile["specialization_data"])["options"]  # all of them: the hook's own omit maxnreg
            record = _compile(source, fn.name, repr, options, stand_in.target)
            names = [p.name for p in fn.jit_function.params]
            record.constants = {names[path[0]]: getattr(v, "value", v) for path, v in compile["constants"].items()}
            records.append(record)
        return True  # handled: Triton launches nothing

    previous_driver, previous_hook = driver._active, knobs.runtime.jit_cache_hook  # triton==3.9 internals
    driver.set_active(stand_in)
    knobs.runtime.jit_cache_hook = compile_instead
    try:
        # the stand-in driver takes CPU tensors to Triton's launcher, as the interpreter would:
        # kernel="triton" lets them through as it does for the interpreter
        with mock.patch("dist_memopt.kernels.select._interpreting", return_value=True):
            yield records
        _disassemble(records)
    finally:
        driver._active = previous_driver
        knobs.runtime.jit_cache_hook = previous_hook
        for function in functions.values():  # their per-device binders were made for the stand-in's target
            function.device_caches.clear()


def _compile(source: Any, name: str, signature: str, options: dict, target: Any) -> Compiled:
    import triton

    record = Compiled(name, signature, target.arch, num_warps=options["num_warps"])
    start = time.perf_counter()
    try:
        kernel = triton.compile(source, target=target, options={k: options[k] for k in _OPTIONS})
    except Exception as error:  # noqa: BLE001 - reported per kernel: the caller sees them all
        record.error = f"{type(error).__name__}: {error}"
        return record
    record.seconds = time.perf_counter() - start
    record.ptx, record.cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    record.shared_bytes = kernel.metadata.shared
    return record  # disassembled with the others when the step is done (_disassemble)
