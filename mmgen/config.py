"""Typed run configs: nested dataclasses filled from YAML, then `a.b=value` dot-list overrides (lingua style).

Unknown keys are rejected with the list of accepted ones, so a typo never silently falls back to a default, and
every value is checked against its field's type (`train.steps=abc`, `train.batch_size=3.5` or `train.fsdp=maybe`
raise an error naming the key, the value and the expected type).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")
    d[parts[-1]] = value


def _build(cls, data: Any, where: str):
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where or '<root>'}; accepted: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}".lstrip(".")
        typ = hints[name]
        if dataclasses.is_dataclass(_strip_optional(typ)):
            kwargs[name] = _build(_strip_optional(typ), value, key)
        else:
            kwargs[name] = _check(typ, value, key)
    return cls(**kwargs)


def _strip_optional(typ):
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return typ


def _type_name(typ) -> str:
    return getattr(typ, "__name__", None) if typing.get_origin(typ) is None else str(typ).replace("typing.", "")


def _check(typ, value: Any, key: str):
    """`value` as field type `typ` (a YAML scalar or list), or a ValueError naming the key, value and type."""
    if typ is Any:
        return value
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, key)
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"config key {key} must be {_type_name(typ)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"config key {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list) or typ in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key} must be a list ({_type_name(typ)}), got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_check(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ValueError(f"config key {key} must have {len(args)} entries ({_type_name(typ)}), got {value!r}")
            items = [_check(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        elif origin is list and args:
            items = [_check(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return tuple(items) if (origin or typ) is tuple else items
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key} must be a mapping, got {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"config key {key} must be a number, got {value!r}")
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key} must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"config key {key} must be a string, got {value!r}")
        return str(value)  # a path or name YAML read as a number (`name=2024`)
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return _build(cls, data, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
