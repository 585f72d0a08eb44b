"""The optimizers the benchmarks compare, built the way a user would build them.

Baselines use the first-moment setting of the SMMF paper's fine-tuning configurations
(Tables 19–23: β1 = 0.9 for every optimizer) where the implementation has one, because their
memory figures include that momentum. Learning rates only matter for timing stability here.
Quirks handled as a user would: ``came_pytorch.CAME`` has ``lr=None`` as default but asserts
``lr > 0`` (so ``lr`` is always given); ``torch.optim.Adafactor`` has no first moment at all, so
the paper's β1 = 0.9 Adafactor is also shown through ``pytorch_optimizer.AdaFactor``;
``pytorch_optimizer.SM3`` allocates its momentum buffer even with ``momentum=0``. All baselines step
0-d, 1-d and 4-d parameters as they are (tested on the AwkwardModel shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

import dist_memopt as dm

__all__ = ["OptimizerSpec", "OPTIMIZERS", "build_optimizer", "check_optimizer_names"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[[Iterable[Tensor]], torch.optim.Optimizer]
    source: str  # how it is constructed, printed under the tables
    paper: Optional[str] = None  # the SMMF paper's column this row compares with


def _adafactor_with_momentum(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    from pytorch_optimizer import AdaFactor

    return AdaFactor(params, lr=1e-3, betas=(0.9, 0.999), momentum_dtype=torch.float32)


def _came(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    from came_pytorch import CAME

    return CAME(params, lr=2e-4, betas=(0.9, 0.999, 0.9999))


def _deepspeed_cpu_adam(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CPU-only machine; DeepSpeed's own choice elsewhere
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=1e-3, adamw_mode=True)


def _sm3(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    from pytorch_optimizer import SM3

    return SM3(params, lr=0.1, momentum=0.9)


_SPECS = (
    OptimizerSpec("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), "torch.optim.AdamW(fused=True)", "Adam"),
    OptimizerSpec("AdamW-foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True), "torch.optim.AdamW(foreach=True)", "Adam"),
    OptimizerSpec("DeepSpeedCPUAdam", _deepspeed_cpu_adam, "deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True): ZeRO-Offload's optimizer", "Adam"),
    OptimizerSpec("Adafactor", lambda p: torch.optim.Adafactor(p, lr=1e-2, foreach=True), "torch.optim.Adafactor(foreach=True): no first moment", "Adafactor"),
    OptimizerSpec("Adafactor-b1", _adafactor_with_momentum, "pytorch_optimizer.AdaFactor(betas=(0.9, 0.999), fp32 momentum)", "Adafactor"),
    OptimizerSpec("CAME", _came, "came_pytorch.CAME(lr=2e-4, betas=(0.9, 0.999, 0.9999))", "CAME"),
    OptimizerSpec("SM3", _sm3, "pytorch_optimizer.SM3(momentum=0.9)", "SM3"),
    OptimizerSpec("SMMF", lambda p: dm.SMMF(p), "dist_memopt.SMMF() defaults (check_finite=True)", "SMMF"),
    OptimizerSpec("Alada", lambda p: dm.Alada(p), "dist_memopt.Alada() defaults (check_finite=True)"),
    OptimizerSpec("Alada-M-in-grad", lambda p: dm.Alada(p, momentum_in_grad=True), "dist_memopt.Alada(momentum_in_grad=True): M lives in .grad"),
    OptimizerSpec("SMMF-nocheck", lambda p: dm.SMMF(p, check_finite=False), "dist_memopt.SMMF(check_finite=False)", "SMMF"),
    OptimizerSpec("Alada-nocheck", lambda p: dm.Alada(p, check_finite=False), "dist_memopt.Alada(check_finite=False)"),
    OptimizerSpec("SMMF-torch", lambda p: dm.SMMF(p, kernel="torch"), "dist_memopt.SMMF(kernel='torch'): torch ops, no fused kernel", "SMMF"),
    OptimizerSpec("Alada-torch", lambda p: dm.Alada(p, kernel="torch"), "dist_memopt.Alada(kernel='torch'): torch ops, no fused kernel"),
    OptimizerSpec("SMMF-per-tensor", lambda p: dm.SMMF(p, foreach=False), "dist_memopt.SMMF(foreach=False): no batched fast path for small tensors", "SMMF"),
    OptimizerSpec("SMMF-triton", lambda p: dm.SMMF(p, kernel="triton"), "dist_memopt.SMMF(kernel='triton'): the fused Triton kernels", "SMMF"),
    OptimizerSpec("SMMF-triton-nocheck", lambda p: dm.SMMF(p, kernel="triton", check_finite=False), "dist_memopt.SMMF(kernel='triton', check_finite=False)", "SMMF"),
    OptimizerSpec("Alada-triton", lambda p: dm.Alada(p, kernel="triton"), "dist_memopt.Alada(kernel='triton'): the fused Triton kernels"),
    OptimizerSpec("Alada-triton-nocheck", lambda p: dm.Alada(p, kernel="triton", check_finite=False), "dist_memopt.Alada(kernel='triton', check_finite=False)"),
    OptimizerSpec("Alada-per-tensor", lambda p: dm.Alada(p, foreach=False), "dist_memopt.Alada(foreach=False): no batched fast path for small tensors"),
)

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _SPECS}


def check_optimizer_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown} (known: {', '.join(OPTIMIZERS)})")
    return names


def build_optimizer(name: str, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    check_optimizer_names([name])
    return OPTIMIZERS[name].build(params)
