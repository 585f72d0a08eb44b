"""Which implementation steps a parameter group: ``kernel="auto" | "torch" | "triton"``.

``"auto"`` picks the fused Triton kernels on CUDA when Triton imports (each kernel checked against
the torch path on its first use, :mod:`.verify`), the torch path elsewhere;
``"triton"`` insists (on CPU tensors it runs Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before Triton is imported: that is how CI tests the
kernels); ``"torch"`` never uses them. Both implementations compute the same equations.
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

from dist_memopt.kernels import launch

__all__ = ["KERNELS", "SUPPORTED_TRITON", "TRITON_DEVICES", "check_kernel", "use_triton", "takes_kernel", "triton_available", "triton_problem", "fused_item", "fused_step"]

KERNELS = ("auto", "torch", "triton")
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
    # counting launches (launch.count_only) or compiling them (kernels.compile) runs no kernel,
    # so it needs no interpreter
    cpu_ok = _interpreting() or launch.runs_nothing()
    if kernel == "auto":
        return supported and device.type in devices and triton_available()
    if not supported:
        raise RuntimeError("kernel='triton' is not implemented for these settings; use kernel='auto' or 'torch'")
    problem = triton_problem()
    if problem is not None:
        raise RuntimeError(problem)
    if not (device.type == "cuda" or (device.type == "cpu" and cpu_ok)):
        raise RuntimeError(
            f"kernel='triton' runs on CUDA tensors, or on CPU tensors through Triton's interpreter with "
            f"TRITON_INTERPRET=1 set before triton is imported (best: in the environment before Python "
            f"starts); these tensors are on {device}"
        )
    return True


def takes_kernel(optimizer: type, group: dict[str, Any], weight: Tensor, grad: Tensor, devices: tuple[str, ...] = TRITON_DEVICES) -> bool:
    """:func:`use_triton` for a parameter of an ``optimizer`` class, whose kernel is checked against
    the torch path before its first use on a device of ``devices`` (:mod:`.verify`): on a mismatch
    ``"auto"`` takes the torch path and ``"triton"`` raises."""
    if not use_triton(group, weight.device, devices=devices):
        return False
    if weight.device.type not in devices or launch.runs_nothing():
        return True  # the interpreter in tests, or launches only counted or compiled
    from dist_memopt.kernels import verify

    return verify.verified(optimizer, group, weight.device, (weight.dtype, grad.dtype))


def fused_item(item: Any) -> bool:
    """Whether a step item (its group and weight device) takes the Triton kernels."""
    return use_triton(item.group, item.weight.device)


def fused_step(items: list[Any], kind: str) -> Any:
    """A new ``dist_memopt.kernels.<kind>_triton.Fused<KIND>`` step for ``items``, those that take
    the kernels (imported only then: Triton is not needed otherwise), or None when there are none."""
    if not items:
        return None
    module = importlib.import_module(f"dist_memopt.kernels.{kind.lower()}_triton")
    return getattr(module, f"Fused{kind}")()
