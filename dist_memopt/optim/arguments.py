"""Optimizer constructor arguments as config files name them (ds_config, YAML, Megatron keywords).

JSON and YAML know lists, not tuples, and a misspelt key must be an error that lists the valid
ones: every place that builds an optimizer from a config asks here.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

__all__ = ["constructor_arguments", "as_call_arguments", "warn_adam_values"]

#: Alada's own (paper) values for the hyperparameters it shares with Adam
ALADA_PAPER = {"betas": (0.9, 0.9), "eps": 1e-16}


def constructor_arguments(cls: type) -> list[str]:
    """Named keyword arguments ``cls(params, ...)`` accepts, in signature order."""
    parameters = inspect.signature(cls.__init__).parameters.items()
    return [
        name
        for name, p in parameters
        if name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def as_call_arguments(params: dict[str, Any]) -> dict[str, Any]:
    """List values (``"betas": [0.9, 0.9]``) become the tuples constructors expect."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in params.items()}


def warn_adam_values(cls: type, params: dict[str, Any], adam_values: dict[str, Any], source: str) -> None:
    """Warn when Alada gets a framework's Adam defaults (``source`` says whose), which a config
    renamed from AdamW, or HF's ``"auto"``, hands it instead of the paper's values."""
    if cls.__name__ != "Alada":
        return
    hits = {k: v for k, v in adam_values.items() if k in params and as_call_arguments({k: params[k]})[k] == v}
    if hits:
        got = ", ".join(f"{k}={v!r}" for k, v in hits.items())
        paper = ", ".join(f"{k}={ALADA_PAPER[k]!r}" for k in hits)
        warnings.warn(f"Alada got {source}'s Adam values ({got}); its paper uses {paper}", UserWarning, stacklevel=3)
