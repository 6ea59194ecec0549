"""Python config files and `--set key=value` overrides, shared by every command line.

A config file is a Python file defining a function (`get_config()` by default) that returns a
frozen dataclass (training recipes, mesh presets, demo and benchmark configs). Any field, nested
with dots, can be overridden on the command line; values are parsed according to the dataclass
field's type annotation, and the dataclasses' own validation runs again afterwards.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any

from gmod_jax.config import ModelConfig


def load_config_file(path: str | Path, expected: type, function: str = "get_config"):
    """Import a Python config file (recipes, mesh presets, demo and bench configs) and return what
    its `function()` returns, checked to be an `expected`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ValueError(f"{path} defines no {function}()")
    value = getattr(module, function)()
    if not isinstance(value, expected):
        raise TypeError(f"{path}: {function}() returned {type(value).__name__}, expected {expected.__name__}")
    return value


# ----------------------------------------------------------------------------------------------
# Overrides


class OverrideError(ValueError):
    """A `--set key=value` that names no field or whose value does not parse."""


def apply_overrides(cfg, overrides: list[str] | tuple[str, ...]):
    """Apply `a.b.c=value` strings to a (nested) frozen dataclass; returns the new object."""
    for item in overrides:
        if "=" not in item:
            raise OverrideError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise OverrideError(f"override {item!r} has an empty key")
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj, parts: list[str], raw: str, full_key: str):
    if not dataclasses.is_dataclass(obj):
        raise OverrideError(f"cannot set {full_key!r}: {'.'.join(full_key.split('.')[:-len(parts)])} "
                            f"is {type(obj).__name__}, not a config")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = parts[0]
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise OverrideError(f"unknown config key {full_key!r}: {type(obj).__name__} has no field {name!r}{hint} "
                            f"(fields: {', '.join(sorted(fields))})")
    hint = typing.get_type_hints(type(obj))[name]
    if len(parts) == 1:
        value = _parse(raw, hint, full_key)
    else:
        child = getattr(obj, name)
        if child is None:
            raise OverrideError(f"cannot set {full_key!r}: {name} is None in this config")
        value = _set(child, parts[1:], raw, full_key)
    try:
        return dataclasses.replace(obj, **{name: value})
    except (ValueError, TypeError) as e:
        raise OverrideError(f"{full_key}={raw!r} rejected: {e}") from e


_NONE = ("none", "null")


def _parse(raw: str, hint, key: str):
    """Parse a command-line string into a value of type `hint`."""
    text = raw.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in _NONE:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(raw, arg, key)
            except OverrideError as e:
                errors.append(str(e))
        raise OverrideError(f"cannot parse {key}={raw!r} as {hint}: {'; '.join(errors)}")
    if hint is Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    if hint is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise OverrideError(f"{key}: {raw!r} is not a boolean (true/false)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise OverrideError(f"{key}: {raw!r} is not an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise OverrideError(f"{key}: {raw!r} is not a number") from None
    if hint is str:
        return raw
    if origin is tuple:
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise OverrideError(f"{key}: {raw!r} is not a JSON list: {e}") from None
            items = [json.dumps(i) if not isinstance(i, str) else i for i in items]
        else:
            items = [s for s in (p.strip() for p in text.split(",")) if s] if text else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(i, args[0], key) for i in items)
        if args and len(args) != len(items):
            raise OverrideError(f"{key}: expected {len(args)} comma-separated values, got {len(items)}")
        return tuple(_parse(i, a, key) for i, a in zip(items, args)) if args else tuple(items)
    if dataclasses.is_dataclass(hint):
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            raise OverrideError(f"{key}: set the fields of {hint.__name__} one by one ({key}.<field>=...) "
                                f"or pass a JSON object") from None
        if hint is ModelConfig:
            return ModelConfig.from_dict(d)
        return hint(**d)
    raise OverrideError(f"{key}: no parser for type {hint}")
