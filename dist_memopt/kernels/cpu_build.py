"""Builds and loads the fused CPU kernels: C++ (``csrc/``) compiled on first use, then cached.

Built the way torch builds extensions and DeepSpeed builds its CPU Adam: ``torch.utils.
cpp_extension.load`` runs the machine's C++ compiler through ninja into ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``) and later processes load the cached library. The code is
compiled for the building machine (``-march=native``: AVX2/FMA/F16C blocks where the processor
has them, scalar code elsewhere), so the cache key includes the sources and the processor's
features. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["cpu_kernels", "cpu_kernels_problem", "loaded_cpu_kernels", "CpuKernelsUnavailable", "SOURCES", "simd_level", "processor_name"]

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("ops.cpp",)
# -fopenmp: at::parallel_for is a header template over torch's OpenMP backend, serial without it
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-fopenmp"]


class CpuKernelsUnavailable(RuntimeError):
    """The fused CPU kernels cannot be built or loaded here (the message says why)."""


def _processor_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_level() -> str:
    """The blocks the kernels compile to on this processor (``-march=native``): ``"avx512"``
    (sixteen lanes), ``"avx2"`` (eight; AVX2, FMA and F16C) or ``"scalar"``, as ``csrc/simd.h``
    decides; read from the processor's flags, without building anything."""
    flags = set(_processor_features().split())
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx512" if "avx512f" in flags else "avx2"
    return "scalar"


def processor_name() -> str:
    """The processor's model name, family and model (``/proc/cpuinfo``), or what ``platform`` says."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def _build_name() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(FLAGS).encode() + _processor_features().encode())
    return f"dist_memopt_cpu_{digest.hexdigest()[:16]}"


def _compile(name: str, flags: list[str]) -> ModuleType:
    """``csrc/`` built with ``flags`` (cached under ``name``); raises what the build raised."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / source) for source in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


_loaded: Optional[ModuleType] = None  # the module once this process has loaded it


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    global _loaded
    try:
        _loaded = _compile(_build_name(), FLAGS)
        return _loaded, None
    except Exception as error:  # a missing compiler or ninja, a failed build, an unloadable library
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, (f"the fused CPU kernels could not be built ({type(error).__name__}: {first}); they need a C++17 "
                      "compiler (g++ or clang++) and ninja (`pip install ninja`)")


def cpu_kernels() -> ModuleType:
    """The compiled module (built on first call; about a minute, once per machine and source)."""
    module, problem = _load()
    if module is None:
        raise CpuKernelsUnavailable(problem)
    return module


def loaded_cpu_kernels() -> Optional[ModuleType]:
    """The compiled module where this process has already loaded it, else None (builds nothing)."""
    return _loaded


def cpu_kernels_problem() -> Optional[str]:
    """Why the fused CPU kernels cannot be used here, or None (builds them if needed)."""
    return _load()[1]
