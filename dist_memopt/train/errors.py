"""The launcher's configuration error, apart from the schema so that every part can raise it."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; raised before any process starts training."""
