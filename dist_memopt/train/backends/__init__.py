"""Training backends by name: how the model is wrapped, stepped and checkpointed.

Each backend is a :class:`BackendSpec` in :data:`BACKENDS`: ``check(config)`` runs while the
configuration is validated (before any process group exists) and ``build(...)`` returns an
:class:`~dist_memopt.train.backends.base.Engine`. Modules are imported only when built, so
validation stays fast and a backend's framework is needed only when it is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from dist_memopt.train.backends.base import Engine
    from dist_memopt.train.schema import RunConfig

__all__ = ["BACKENDS", "BackendSpec", "check", "build_engine"]


@dataclass(frozen=True)
class BackendSpec:
    module: str  # dist_memopt.train.backends.<module> defines build(model, config, context)
    check: Callable[["RunConfig"], None] = lambda config: None


def _check_megatron(config: "RunConfig") -> None:
    from dist_memopt.train.backends.megatron import check as check_megatron  # light: megatron-core loads on build

    check_megatron(config)


BACKENDS: dict[str, BackendSpec] = {
    "fsdp2": BackendSpec("native"),
    "fsdp1": BackendSpec("native"),
    "ddp": BackendSpec("native"),
    "deepspeed": BackendSpec("deepspeed"),
    "megatron": BackendSpec("megatron", _check_megatron),
}


def check(config: "RunConfig") -> None:
    BACKENDS[config.parallel.backend].check(config)


def build_engine(model, config: "RunConfig", context) -> "Engine":
    """Wrap ``model`` for ``config.parallel.backend`` and create its optimizer."""
    module = importlib.import_module(f"dist_memopt.train.backends.{BACKENDS[config.parallel.backend].module}")
    return module.build(model, config, context)
