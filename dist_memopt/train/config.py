"""The run configuration: YAML composition, ``--set`` overrides, typing, output.

A run is one YAML file with sections ``model``, ``train``, ``optimizer``, ``parallel``, ``data``,
``checkpoint`` and ``log`` (the schema: :mod:`dist_memopt.train.schema`); names follow
Megatron-LM's arguments where one exists. A file may start with ``base: other.yaml`` (relative to
itself): it is the base's settings with this file's merged on top. Changing ``optimizer.type`` (in
a file or with ``--set``) drops the inherited ``optimizer.params``, since constructor arguments
belong to one optimizer.

Everything is checked before any process group exists: unknown keys, wrong types and values
outside their choices here, cross-field rules in :mod:`dist_memopt.train.checks`, the parallel
layout in :mod:`dist_memopt.train.layout`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_memopt.train.checks import validate
from dist_memopt.train.errors import ConfigError
from dist_memopt.train.layout import check_world_size
from dist_memopt.train.schema import RunConfig  # the sections: dist_memopt.train.schema

__all__ = [
    "ConfigError",
    "RunConfig",
    "load_config",
    "validate",
    "check_world_size",
    "to_yaml",
    "config_to_dict",
]

# --- YAML ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None


def _read_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The file's settings with its ``base:`` chain merged underneath."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    return _merge(_read_file(path.parent / base, chain + (path,)), data)


def _merge(base: dict, top: dict) -> dict:
    """Recursive merge; a changed ``optimizer.type`` replaces ``optimizer.params`` instead."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = _merge(out[key], value)
            if "type" in value and value.get("type") != out[key].get("type") and "params" in out[key]:
                merged["params"] = dict(value.get("params") or {})
            out[key] = merged
        else:
            out[key] = value
    return out


# --- typing ------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str, choices: Optional[tuple] = None) -> Any:
    """``value`` as ``annotation`` (int, float, str, bool, dict, Optional[...]) or a ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, choices)
    kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            if choices and value not in choices:
                raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
            return value
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
        kind = "mapping"
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported schema type {annotation!r} at {where}")
    raise ConfigError(f"{where}: expected {kind}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
            f"(known: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        annotation = types[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, path)
        else:
            kwargs[name] = _coerce(value, annotation, path, fields[name].metadata.get("choices"))
    return cls(**kwargs)


# --- overrides -----------------------------------------------------------------------------------


def _apply_override(data: dict, item: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML) to the raw settings."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: KEY must be section.name, e.g. train.lr (sections: {', '.join(_SECTIONS)})")
    value = _parse_yaml(text, f"--set {key}") if text.strip() else None
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    if parts == ["optimizer", "type"] and node.get("type") != value:
        node.pop("params", None)
    node[parts[-1]] = value


_SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "name"]


def _config_name(path: Path) -> str:
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None, world_size: Optional[int] = None) -> RunConfig:
    """Read, compose, override, type and validate a run configuration.

    ``world_size`` (when known) also checks that the global batch divides into micro-batches.
    Raises :class:`ConfigError` with the offending key for anything invalid.
    """
    path = Path(path)
    data = _read_file(path)
    for item in overrides or []:
        _apply_override(data, item)
    if "name" in data:
        raise ConfigError(f"{path}: unknown key 'name' (the run's name comes from the file name)")
    config = _build(RunConfig, data, "")
    config.name = _config_name(path)
    validate(config, world_size)
    return config


# --- output --------------------------------------------------------------------------------------


def config_to_dict(config: RunConfig) -> dict:
    data = dataclasses.asdict(config)
    data.pop("name")
    return data


def _represent_tuple(dumper: yaml.SafeDumper, value: tuple) -> Any:
    return dumper.represent_list(list(value))


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(tuple, _represent_tuple)


def to_yaml(config: RunConfig) -> str:
    """The resolved configuration as YAML that :func:`load_config` reads back unchanged."""
    return yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
