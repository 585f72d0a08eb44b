"""Which implementation steps a parameter group: ``kernel="auto" | "torch" | "triton" | "cpu"``.

``"auto"`` picks the fused Triton kernels on CUDA when Triton imports (each kernel checked against
the torch path on its first use, :mod:`.verify`), the fused CPU kernels (C++, built on first use)
on CPU tensors when they build, and the torch path otherwise (with one warning saying why).
``"triton"`` insists (on CPU tensors it runs Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before Triton is imported: that is how CI tests the
Triton kernels); ``"cpu"`` insists on the CPU kernels (an error on other devices, or the reason
they could not be built); ``"torch"`` never uses a fused kernel. All compute the same equations.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from dist_memopt.kernels import cpu_build
from dist_memopt.kernels.launch import KernelObserver

__all__ = ["KERNELS", "SUPPORTED_TRITON", "TRITON_DEVICES", "check_kernel", "use_triton", "takes_kernel", "triton_available",
           "triton_problem", "fused_step", "FusedRunners"]

KERNELS = ("auto", "torch", "triton", "cpu")
#: device types on which ``"auto"`` picks the Triton kernels, after :mod:`.verify` checked them
TRITON_DEVICES = ("cuda",)


def check_kernel(group: dict[str, Any], where: str = "") -> None:
    """ValueError naming ``kernel`` unless the group's value is one of :data:`KERNELS`."""
    kernel = group.get("kernel", "auto")
    if kernel not in KERNELS:
        raise ValueError(f"Invalid kernel{where}: {kernel!r} (must be one of {KERNELS})")


#: Triton releases the kernels are tested on (interpreted on CPU, compiled for sm_80/sm_90): the
#: language's semantics (its interpreter, FMA contraction's default) change between releases. 3.9.0
#: is the test extra's (CI); 3.6.0 is torch 2.11's pin and the GPU machine's, 3.7.1 torch 2.12's,
#: 3.8.0 torch 2.14's, each checked with its torch by ``bash launch/torch_release_check.sh`` (the
#: whole suite, the kernels compiled for sm_90 included).
SUPPORTED_TRITON = ("3.6.0", "3.7.1", "3.8.0", "3.9.0")


@functools.lru_cache(maxsize=None)
def triton_problem() -> Optional[str]:
    """Why the Triton kernels cannot be used here (not installed, an untested release), or None."""
    try:
        import triton
    except ImportError:
        return f"kernel='triton' needs the triton package (pip install triton=={SUPPORTED_TRITON[-1]})"
    if triton.__version__.split("+")[0] not in SUPPORTED_TRITON:  # a local build tag is accepted, a pre-release is not
        return (f"dist_memopt's Triton kernels support triton {', '.join(SUPPORTED_TRITON)}, found {triton.__version__}: "
                f"install it with `pip install triton=={SUPPORTED_TRITON[-1]}`, or use kernel='torch' "
                "(the same equations in torch ops)")
    return None


def triton_available() -> bool:
    """Triton imports and is a supported release; ``kernel="auto"`` then uses it on CUDA (else the
    torch path, with one warning when an untested release is installed)."""
    problem = triton_problem()
    if problem is not None and importlib.util.find_spec("triton") is not None:  # installed, untested
        _warn_once(problem)
    return problem is None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message + "; kernel='auto' takes the torch path", RuntimeWarning, stacklevel=3)


def _interpreting() -> bool:
    """TRITON_INTERPRET=1, and set before triton.language was imported (its own helpers, such as
    ``tl.cdiv``, are decorated at import: imported earlier, they cannot run in the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    language = sys.modules.get("triton.language")
    return language is None or type(language.cdiv).__name__ == "InterpretedFunction"


def use_triton(group: dict[str, Any], device: torch.device, supported: bool = True, devices: tuple[str, ...] = TRITON_DEVICES) -> bool:
    """Whether this group's tensors on ``device`` take the Triton kernels.

    ``supported`` is False where the optimizer has no fused kernel for the group's settings
    (then ``"auto"`` falls back to torch and ``"triton"`` is an error); ``devices`` are the device
    types ``"auto"`` picks them on. Raises RuntimeError with the reason when ``kernel="triton"``
    cannot run here.
    """
    kernel = group.get("kernel", "auto")
    if kernel == "torch":
        return False
    if kernel == "auto":
        return supported and device.type in devices and triton_available()
    if not supported:
        raise RuntimeError("kernel='triton' is not implemented for these settings; use kernel='auto' or 'torch'")
    problem = triton_problem()
    if problem is not None:
        raise RuntimeError(problem)
    if not (device.type == "cuda" or (device.type == "cpu" and _interpreting())):
        raise RuntimeError(
            f"kernel='triton' runs on CUDA tensors, or on CPU tensors through Triton's interpreter with "
            f"TRITON_INTERPRET=1 set before triton is imported (best: in the environment before Python "
            f"starts); these tensors are on {device}"
        )
    return True


def _cpu_kernels_usable(kernel: str) -> bool:
    """Whether the fused CPU kernels build here; ``"cpu"`` raises the reason, ``"auto"`` warns it once."""
    problem = cpu_build.cpu_kernels_problem()
    if problem is None:
        return True
    if kernel == "cpu":
        raise RuntimeError(problem)
    _warn_once(problem)
    return False


def takes_kernel(optimizer: type, group: dict[str, Any], weight: Tensor, grad: Tensor,
                 devices: tuple[str, ...] = TRITON_DEVICES) -> Optional[str]:
    """The fused kernel family that steps a parameter of an ``optimizer`` class: ``"cpu"``,
    ``"triton"``, or None for the torch path. A Triton kernel is checked against the torch path
    before its first use on a device of ``devices`` (:mod:`.verify`): on a mismatch ``"auto"``
    takes the torch path and ``"triton"`` raises. Raises RuntimeError with the reason when the
    group insists on a kernel that cannot run here."""
    kernel = group.get("kernel", "auto")
    device = weight.device
    if kernel == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"kernel='cpu' steps CPU tensors; these are on {device} (use kernel='auto')")
        _cpu_kernels_usable(kernel)
        return "cpu"
    if kernel == "auto" and device.type == "cpu" and "cpu" not in devices:
        return "cpu" if _cpu_kernels_usable(kernel) else None
    if not use_triton(group, device, devices=devices):
        return None
    if device.type not in devices:
        return "triton"  # kernel="triton" on CPU tensors: the interpreter, in tests
    from dist_memopt.kernels import verify

    return "triton" if verify.verified(optimizer, group, device, (weight.dtype, grad.dtype)) else None


_RUNNERS = {"triton": ("dist_memopt.kernels.{}_triton", "Fused{}"), "cpu": ("dist_memopt.kernels.{}_cpu", "Cpu{}")}


def fused_step(items: list[Any], kind: str, observer: Optional[KernelObserver] = None) -> Any:
    """The kernel runner of optimizer ``kind`` (``"SMMF"``, ``"Alada"``) for ``items``, those that
    take a fused kernel (``item.kernel`` names its family): a ``Fused<KIND>`` (Triton) or
    ``Cpu<KIND>`` (C++), a :class:`FusedRunners` when both families take part, or None when there
    are no items. Modules are imported only when needed (Triton is not needed otherwise).
    ``observer`` receives the launches (:mod:`dist_memopt.kernels.launch`)."""
    runners = {}
    for item in items:
        if item.kernel not in runners:
            module, cls = _RUNNERS[item.kernel]
            runners[item.kernel] = getattr(importlib.import_module(module.format(kind.lower())), cls.format(kind))(observer)
    if len(runners) <= 1:
        return next(iter(runners.values()), None)
    return FusedRunners(runners)


class FusedRunners:
    """The runners of a step whose items take different kernel families (CPU and CUDA tensors in
    one optimizer): ``add`` goes to the item's family, every other call to all of them."""

    def __init__(self, runners: dict[str, Any]) -> None:
        self._runners = runners

    def add(self, item: Any, *args: Any) -> None:
        self._runners[item.kernel].add(item, *args)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        calls = [getattr(runner, name) for runner in self._runners.values()]
        return lambda: [call() for call in calls]
