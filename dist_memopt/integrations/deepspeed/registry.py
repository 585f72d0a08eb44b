"""The optimizer names a ds_config may use, and building one from its ``params``."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from dist_memopt.optim import SMMF, Alada, FactoredOptimizer
from dist_memopt.optim.arguments import as_call_arguments, constructor_arguments, warn_adam_values

#: what HF Trainer writes for "betas": "auto" and "eps": "auto" (TrainingArguments' adam defaults)
HF_AUTO_VALUES = {"betas": (0.9, 0.999), "eps": 1e-8}

__all__ = ["OPTIMIZERS", "optimizer_class", "build_optimizer"]

#: ds_config ``"optimizer": {"type": ...}`` names (matched case-insensitively) → classes.
OPTIMIZERS: dict[str, type[FactoredOptimizer]] = {"SMMF": SMMF, "Alada": Alada}


def optimizer_class(name: Optional[str]) -> Optional[type[FactoredOptimizer]]:
    """The class a ds_config optimizer ``type`` names, or None if it is not one of ours."""
    if not isinstance(name, str):
        return None
    for key, cls in OPTIMIZERS.items():
        if key.lower() == name.lower():
            return cls
    return None


def build_optimizer(name: str, model_parameters: Iterable, params: Optional[dict[str, Any]]) -> FactoredOptimizer:
    """``cls(model_parameters, **params)`` for the class ``name`` names, after checking the names.

    JSON has no tuples, so list values (``"betas": [0.9, 0.9]``) become tuples.
    """
    cls = optimizer_class(name)
    if cls is None:
        raise ValueError(f"unknown dist_memopt optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    params = dict(params or {})
    valid = constructor_arguments(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f'ds_config "optimizer" of type "{name}" has unknown params {unknown}; {cls.__name__} accepts '
            f"{', '.join(valid)}. (Gradient clipping is DeepSpeed's \"gradient_clipping\" setting.)"
        )
    warn_adam_values(cls, params, HF_AUTO_VALUES, 'HF Trainer ("auto" in the ds_config)')
    return cls(model_parameters, **as_call_arguments(params))
