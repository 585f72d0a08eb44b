"""Optimizer constructor arguments as config files name them (ds_config, YAML, Megatron keywords).

JSON and YAML know lists, not tuples, and a misspelt key must be an error that lists the valid
ones: every place that builds an optimizer from a config asks here.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["constructor_arguments", "as_call_arguments"]


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
