"""Typed run configs: nested dataclasses filled from YAML, then `a.b=value` dot-list overrides (lingua style).

Unknown keys are rejected with the list of accepted ones, so a typo never silently falls back to a default.
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
        typ = hints[name]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            typ = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{where}.{name}".lstrip("."))
        elif typ in (tuple,) or typing.get_origin(typ) is tuple:
            kwargs[name] = tuple(value) if value is not None else None
        elif typ is float and not isinstance(value, bool) and isinstance(value, (int, str)):
            try:  # YAML 1.1 reads "3e-3" (no dot) as a string
                kwargs[name] = float(value)
            except ValueError:
                raise ValueError(f"config key {where + '.' if where else ''}{name} must be a number, "
                                 f"got {value!r}") from None
        else:
            kwargs[name] = value
    return cls(**kwargs)


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
