"""The one place where dist_memopt hooks into DeepSpeed: :func:`install`.

DeepSpeed 0.19 resolves ds_config optimizer names through a fixed list and then
``getattr(torch.optim, name)``; it has no plugin registry. ZeRO accepts a client optimizer only if
its type is in ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS`` (else it demands
``zero_allow_untested_optimizer`` and then factorizes the flat partitions as if they were
parameters). :func:`install` therefore

1. appends SMMF and Alada to ``ZERO_SUPPORTED_OPTIMIZERS`` (a list DeepSpeed itself extends at run
   time, e.g. for Muon);
2. wraps three methods of ``DeepSpeedEngine``, each falling through to DeepSpeed's own code for
   anything that is not ours:

   * ``_is_supported_optimizer(name)``: also true for our names;
   * ``_configure_basic_optimizer(model_parameters)``: builds ours from ``"params"`` (names
     checked, see :func:`~dist_memopt.integrations.deepspeed.registry.build_optimizer`);
   * ``_configure_optimizer(client_optimizer, model_parameters)``: after DeepSpeed has wrapped the
     optimizer (ZeRO 1/2/3, BF16, fp16), declares where every parameter's fragment lies in the
     tensors DeepSpeed will step (:mod:`.layouts`), undoes the state-priming step of its
     stage-0 fp16/bf16 wrapper, and links DeepSpeed's state helpers and
     checkpoint loading to them (per engine instance, nothing global: :mod:`.state`,
     :mod:`.universal`). Under ZeRO-Offload an instance of ours is accepted as the host
     optimizer, as one named in the ds_config is: DeepSpeed refuses other client optimizers there
     (``zero_force_ds_cpu_optimizer``) because their step would be slow on the host, and ours
     step host tensors with their fused CPU kernels.

It is idempotent: a second call changes nothing. Torch's ``torch.optim`` namespace is not touched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from dist_memopt.integrations.deepspeed.layouts import describe_partitions
from dist_memopt.integrations.deepspeed.registry import OPTIMIZERS, build_optimizer, optimizer_class
from dist_memopt.integrations.deepspeed.state import link_state_helpers, undo_state_priming
from dist_memopt.integrations.deepspeed.universal import enable_universal
from dist_memopt.optim.base import FactoredOptimizer

__all__ = ["install", "installed", "attach", "refuse_momentum_in_grad"]

_MARK = "_dist_memopt_hook"


def install() -> None:
    """Teach DeepSpeed our optimizer names and shard layouts (idempotent; see module docstring)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils

    for cls in OPTIMIZERS.values():
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)
    _wrap(DeepSpeedEngine, "_is_supported_optimizer", _supported_names)
    _wrap(DeepSpeedEngine, "_configure_basic_optimizer", _build_by_name)
    _wrap(DeepSpeedEngine, "_configure_optimizer", _attach_after_wrapping)


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return all(getattr(DeepSpeedEngine.__dict__[name], _MARK, False) for name in _WRAPPED)


_WRAPPED = ("_is_supported_optimizer", "_configure_basic_optimizer", "_configure_optimizer")


def _wrap(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = cls.__dict__[name]
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)


def _supported_names(original: Callable) -> Callable:
    def _is_supported_optimizer(self: Any, optimizer_name: str) -> bool:
        return optimizer_class(optimizer_name) is not None or original(self, optimizer_name)

    return _is_supported_optimizer


def _build_by_name(original: Callable) -> Callable:
    def _configure_basic_optimizer(self: Any, model_parameters: Any) -> Any:
        name = self.optimizer_name()
        if optimizer_class(name) is None:
            return original(self, model_parameters)
        return refuse_momentum_in_grad(build_optimizer(name, model_parameters, self.optimizer_params()))

    return _configure_basic_optimizer


def _attach_after_wrapping(original: Callable) -> Callable:
    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> None:
        refuse_momentum_in_grad(client_optimizer)
        if isinstance(client_optimizer, FactoredOptimizer):
            self._config.zero_force_ds_cpu_optimizer = False  # this engine's config only
        original(self, client_optimizer, model_parameters)
        attach(self)

    return _configure_optimizer


def refuse_momentum_in_grad(optimizer: Any) -> Any:
    """``optimizer``, unless it keeps Alada's momentum in ``.grad``: DeepSpeed hands the optimizer
    fresh gradient partitions every step and its checkpoints hold no gradients, so the momentum
    could neither survive a step nor a resume there."""
    if isinstance(optimizer, FactoredOptimizer) and any(g.get("momentum_in_grad") for g in optimizer.param_groups):
        raise ValueError(
            "Alada(momentum_in_grad=True) cannot run under DeepSpeed: its optimizers replace the "
            "gradients every step and its checkpoints do not carry them; use momentum_in_grad=False"
        )
    return optimizer


def attach(engine: Any) -> None:
    """Declare the layouts of ``engine``'s optimizer tensors if its optimizer is one of ours."""
    optimizer = engine.basic_optimizer
    if not isinstance(optimizer, FactoredOptimizer):
        return
    undo_state_priming(engine.optimizer, optimizer)
    layouts = describe_partitions(engine.optimizer, engine.param_names)
    if layouts:
        link_state_helpers(engine.optimizer, optimizer, layouts)
        enable_universal(engine, optimizer, layouts)
    engine.dist_memopt_layouts = layouts
