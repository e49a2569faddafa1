"""Typed configs: dataclasses <-> plain dicts, JSON and YAML.

Every config in the project is a dataclass; presets are YAML files loaded into the same
dataclasses (never untyped nested dicts). Unknown keys are errors, so a typo in a preset fails
loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from uss_core.errors import ConfigError

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON/YAML-serialisable dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where) if isinstance(value, dict) else value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], where) if len(non_none) == 1 else value
    if origin is tuple and isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        return tuple(_convert(v, item, where) for v in value)
    if origin is list and isinstance(value, (list, tuple)):
        item = args[0] if args else Any
        return [_convert(v, item, where) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict, where: str | None = None) -> T:
    """Build dataclass ``cls`` from a dict, converting nested dataclasses and tuples.

    Raises ConfigError on unknown keys, naming them and the valid ones.
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # missing fields, or a __post_init__ check
        raise ConfigError(f"{where}: {exc}") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load a YAML preset into dataclass ``cls``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return from_dict(cls, data or {}, where=str(path))


def dump_json(obj: Any) -> str:
    """Serialise a dataclass (or plain data) as indented JSON."""
    return json.dumps(to_dict(obj), indent=2, sort_keys=False)
