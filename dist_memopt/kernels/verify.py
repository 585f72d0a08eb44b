"""A fused kernel's first use on a device is checked against the torch path.

The Triton kernels are a second implementation of the optimizers' equations; a compiler, driver
or device can make one compute something else without any error. So before ``kernel="auto"``
(or ``"triton"``) first steps real tensors with a kernel on a device, :func:`verified` steps a
small probe, the same settings on both paths, and compares the weights, once per process for each
optimizer family, device, (weight, gradient) dtype pair and setting (:func:`setting`):

- the probe: a (24, 40) matrix and a 37-element vector of the parameter's dtype, weights
  ``0.02·N(0, 1)``, :data:`STEPS` steps of fixed random gradients at lr :data:`PROBE_LR` (the
  group's other hyperparameters as they are: a user's lr may be tiny, or 0 while
  ``torch.distributed.checkpoint`` initializes the state, which would hide any difference);
- the tolerance: every weight within ``1e-4·u + 2·ulp(w)`` of the torch path's, ``u`` the largest
  change the torch path made to any weight, ``ulp(w)`` the spacing of the dtype at the largest
  weight. The two paths agree to rounding (fp32: within 1e-6·u; bf16/fp16: a stored weight one ulp
  apart); a kernel that gets the update wrong misses it by the size of the update.

On a mismatch, or if the kernel raises, ``"auto"`` takes the torch path for that setting, with
one warning naming the kernel and the difference, and ``"triton"`` raises.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch

__all__ = ["verified", "setting", "probe_difference", "PROBE_LR", "STEPS", "RTOL", "ULPS"]

PROBE_LR = 1e-2
STEPS = 3  # Alada refits p at even steps and q at odd ones, from a first step of its own
RTOL = 1e-4  # of the torch path's largest weight change
ULPS = 2  # of the dtype's spacing at the largest weight
_SHAPES = ((24, 40), (37,))

#: key -> None (passed, or being probed: the probe's own steps are not checked again) or the failure
_RESULTS: dict[tuple, Optional[str]] = {}


def setting(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What selects the kernels' code paths in a param group: its flags and modes (bools, None,
    strings) and which numbers are zero (``weight_decay=0`` skips the decay); not the values of
    the numbers, nor ``lr`` (the probe sets its own)."""
    flags: list[tuple[str, Any]] = []
    for key, value in sorted(group.items()):
        if key in ("params", "param_names", "kernel", "lr"):
            continue
        if value is None or isinstance(value, (bool, str)):
            flags.append((key, value))
        elif isinstance(value, (int, float)):
            flags.append((key, "0" if value == 0 else "nonzero"))
    return tuple(flags)


def verified(optimizer: type, group: dict[str, Any], device: torch.device, dtypes: tuple[torch.dtype, torch.dtype]) -> bool:
    """Whether ``optimizer``'s kernel may step a parameter of ``group`` on ``device`` with these
    (weight, gradient) dtypes; probes it on first use. Raises RuntimeError on a mismatch when the
    group asks for ``kernel="triton"``."""
    key = (optimizer.kernel_family, device, dtypes, setting(group))
    if key not in _RESULTS:
        _RESULTS[key] = None
        _RESULTS[key] = _probe(optimizer, group, device, dtypes)
    failure = _RESULTS[key]
    if failure is None:
        return True
    message = (
        f"dist_memopt's {optimizer.kernel_family} Triton kernel for {dtypes[0]} weights and {dtypes[1]} "
        f"gradients on {device} ({_describe(key[3])}) does not match the torch path on a probe: {failure}"
    )
    if group.get("kernel") == "triton":
        raise RuntimeError(message + "; use kernel='auto' or kernel='torch'")
    _warn_once(message + "; kernel='auto' uses the torch path for these settings")
    return False


def _probe(optimizer: type, group: dict[str, Any], device: torch.device, dtypes: tuple[torch.dtype, torch.dtype]) -> Optional[str]:
    try:
        difference, allowed = probe_difference(optimizer, group, device, dtypes)
    except Exception as error:  # a kernel that cannot run is a kernel that does not match
        return f"it raised {type(error).__name__}: {error}"
    if difference <= allowed:
        return None
    return f"a weight differs by {difference:.3g} after {STEPS} steps (tolerance {allowed:.3g})"


def probe_difference(
    optimizer: type, group: dict[str, Any], device: torch.device, dtypes: tuple[torch.dtype, torch.dtype]
) -> tuple[float, float]:
    """(largest weight difference between the kernel and the torch path, its tolerance) after
    :data:`STEPS` probe steps with ``group``'s settings."""
    weight_dtype, grad_dtype = dtypes
    generator = torch.Generator().manual_seed(0)
    starts = [0.02 * torch.randn(shape, generator=generator) for shape in _SHAPES]
    grads = [[torch.randn(shape, generator=generator) for shape in _SHAPES] for _ in range(STEPS)]
    settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    settings["lr"] = PROBE_LR
    results = {}
    for kernel in ("triton", "torch"):
        params = [torch.nn.Parameter(start.to(device, weight_dtype, copy=True)) for start in starts]
        stepped = optimizer([dict(settings, params=params, kernel=kernel)])
        for step_grads in grads:
            stepped.zero_grad()  # Alada's momentum_in_grad decays .grad here instead of clearing it
            for param, grad in zip(params, step_grads):
                grad = grad.to(device, grad_dtype, copy=True)
                param.grad = grad if param.grad is None else param.grad.add_(grad)
            stepped.step()
        results[kernel] = [p.detach().double().cpu() for p in params]
    start = [s.to(weight_dtype).double() for s in starts]
    change = max((t - s).abs().max().item() for t, s in zip(results["torch"], start))
    largest = max(t.abs().max().item() for t in results["torch"])
    ulp = torch.finfo(weight_dtype).eps * 2.0 ** torch.tensor(largest).log2().floor().item()
    difference = max((k - t).abs().max().item() for k, t in zip(results["triton"], results["torch"]))
    return difference, RTOL * change + ULPS * ulp


def _describe(flags: tuple[tuple[str, Any], ...]) -> str:
    return ", ".join(f"{key}={value}" for key, value in flags)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _forget() -> None:
    """Forget every probe's result (tests)."""
    _RESULTS.clear()
    _warn_once.cache_clear()
