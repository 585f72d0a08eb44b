"""torchtitan (0.3.0): SMMF and Alada by name in a recipe's ``optimizer`` config.

torchtitan resolves optimizer names from a fixed dict inside :class:`OptimizersContainer`, so a
recipe switches with this module's container (and its ``Config``, or ``build()`` would make the
base class)::

    from dist_memopt.integrations.torchtitan import default_smmf
    config.optimizer = default_smmf(lr=8e-4, weight_decay=0.1)

Groups naming ``"SMMF"``/``"Alada"`` get torchtitan's ``implementation`` as our ``foreach``
(``"foreach"``: the batched fast path; ``"for-loop"``: per tensor); everything torchtitan does
around the optimizer (FQN-keyed DCP checkpoints, its zero-gradient ``lr=0`` warm-up step, LR
schedulers, mixed optimizer types) is unchanged. Keys that would be ignored are errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version as _installed
from typing import Any, Callable, Literal, Optional

from torch.optim import Optimizer

from dist_memopt.groups import NO_DECAY_NAMES
from dist_memopt.integrations.versions import UnsupportedVersion, check_version
from dist_memopt.optim import SMMF, Alada, FactoredOptimizer
from dist_memopt.optim.arguments import as_call_arguments, constructor_arguments, warn_adam_values

__all__ = [
    "SUPPORTED_TORCHTITAN_VERSIONS",
    "UnsupportedVersion",
    "check_torchtitan_version",
    "OPTIMIZERS",
    "OptimizersContainer",
    "ParamGroupConfig",
    "default_smmf",
    "default_alada",
]

#: Releases whose OptimizersContainer this adapter was checked against (pinned in pyproject's extra).
SUPPORTED_TORCHTITAN_VERSIONS = ("0.3.0",)


def check_torchtitan_version(installed: Optional[str] = None) -> str:
    """The installed torchtitan version, or :class:`UnsupportedVersion` for an untested release."""
    return check_version("torchtitan", installed or _installed("torchtitan"), SUPPORTED_TORCHTITAN_VERSIONS,
                         "torchtitan's OptimizersContainer (group building, implementation flags)", "torchtitan")


check_torchtitan_version()

from torchtitan.components.optimizer import OptimizersContainer as _TitanContainer  # noqa: E402
from torchtitan.components.optimizer import ParamGroupConfig  # noqa: E402

#: names a ParamGroupConfig's ``optimizer_name`` may use for our optimizers
OPTIMIZERS: dict[str, type[FactoredOptimizer]] = {"SMMF": SMMF, "Alada": Alada}
#: torchtitan's default_adamw values, which Alada would otherwise take silently
_ADAMW_VALUES = {"betas": (0.9, 0.95), "eps": 1e-8}


def _our_group(cls: type[FactoredOptimizer], group: dict[str, Any], index: int) -> dict[str, Any]:
    """torchtitan's group (impl flags merged in) -> our group, refusing what would be ignored."""
    where = f"{cls.__name__} param group {index} ({len(group['params'])} params, e.g. {group['param_names'][0]!r})"
    group = dict(group)
    if group.pop("fused", False):
        raise ValueError(
            f"{where}: {cls.__name__} has no fused kernel, so fused=True would be ignored; set the optimizer "
            "config's implementation='foreach' (its batched fast path) or 'for-loop' (per tensor), or put "
            "'fused': False in this group's optimizer_kwargs"
        )
    foreach = group.pop("foreach", None)
    valid = constructor_arguments(cls)
    unknown = sorted(set(group) - set(valid) - {"params", "param_names"})
    if unknown:
        hint = " (SMMF has one beta: write 'beta': 0.9)" if "betas" in unknown and cls is SMMF else ""
        raise ValueError(f"{where}: optimizer_kwargs {unknown} would be ignored{hint}; {cls.__name__} accepts {', '.join(valid)}")
    if group.get("momentum_in_grad"):
        raise ValueError(
            f"{where}: momentum_in_grad=True cannot work under torchtitan, which clips .grad and never "
            "scales the loss; leave it False (the first moment is then optimizer state)"
        )
    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    return {**group, **as_call_arguments(hyper), "foreach": None if foreach in (None, True) else False}


def _factory(cls: type[FactoredOptimizer], name: str) -> Callable[..., Optimizer]:
    def build(param_groups: list[dict[str, Any]], **factory_kwargs: Any) -> Optimizer:
        if factory_kwargs:
            raise ValueError(
                f"optimizer_factory_kwargs_by_name[{name!r}] = {sorted(factory_kwargs)}: {cls.__name__} takes "
                "no factory arguments; put hyperparameters in the groups' optimizer_kwargs"
            )
        groups = [_our_group(cls, g, i) for i, g in enumerate(param_groups)]
        for group in groups:
            warn_adam_values(cls, group, _ADAMW_VALUES, "torchtitan's default_adamw (use default_alada())")
        return cls(groups)

    return build


class OptimizersContainer(_TitanContainer):
    """torchtitan's container, resolving ``"SMMF"`` and ``"Alada"`` next to its own names."""

    @dataclass(kw_only=True, slots=True)
    class Config(_TitanContainer.Config):
        implementation: Literal["for-loop", "foreach", "fused", "fused_opt_states_bf16"] = "foreach"
        """As torchtitan's, but defaulting to 'foreach': SMMF and Alada have no fused kernel."""

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name in OPTIMIZERS:
            return _factory(OPTIMIZERS[name], name)
        try:
            return _TitanContainer._resolve_optimizer_factory(name)
        except NotImplementedError:
            raise NotImplementedError(
                f"Optimizer {name} not added: dist_memopt's container knows {sorted(OPTIMIZERS)} and torchtitan's names"
            ) from None


def _default(name: str, kwargs: dict[str, Any], weight_decay: float) -> OptimizersContainer.Config:
    """Two groups: no decay on biases and norms (HF's and Megatron's rule), ``weight_decay`` elsewhere."""
    return OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=NO_DECAY_NAMES.pattern, optimizer_name=name, optimizer_kwargs={**kwargs, "weight_decay": 0.0}),
            ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs={**kwargs, "weight_decay": weight_decay}),
        ]
    )


def default_smmf(lr: float = 8e-4, weight_decay: float = 0.1, **kwargs: Any) -> OptimizersContainer.Config:
    """Like torchtitan's ``default_adamw``, for SMMF (its paper's beta 0.9, eps 1e-8, decay_rate -0.5)."""
    return _default("SMMF", {"lr": lr, "beta": 0.9, "eps": 1e-8, "decay_rate": -0.5, "growth_rate": 0.999, **kwargs}, weight_decay)


def default_alada(lr: float = 8e-4, weight_decay: float = 0.1, **kwargs: Any) -> OptimizersContainer.Config:
    """Like torchtitan's ``default_adamw``, for Alada (its paper's betas (0.9, 0.9), eps 1e-16)."""
    return _default("Alada", {"lr": lr, "betas": (0.9, 0.9), "eps": 1e-16, **kwargs}, weight_decay)
