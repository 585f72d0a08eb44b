"""The launcher's configuration error, apart from the schema so that every part can raise it."""

from __future__ import annotations

from typing import Optional

__all__ = ["ConfigError", "require_positive"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; raised before any process starts training."""


def require_positive(where: str, value: Optional[float], allow_zero: bool = False) -> None:
    """ConfigError naming ``where`` unless ``value`` is None or > 0 (>= 0 with ``allow_zero``)."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
