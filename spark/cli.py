"""Command-line helpers shared by train.py and sample.py: config files, `--config.a.b=v`
overrides with type checking, and one-line errors instead of tracebacks."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import sys
import types
import typing

from spark.config import Config
from spark.errors import ConfigError


def load_config_file(path: str) -> Config:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"get_config() in {path!r} must return spark.config.Config")
    return cfg


def _allowed(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(x for a in typing.get_args(tp) for x in _allowed(a))
    if origin is typing.Literal:
        return ("literal", *typing.get_args(tp))
    if origin is tuple:
        return (tuple,)
    return (tp,)


def _coerce(key: str, raw: str, tp):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    allowed = _allowed(tp)
    if "literal" in allowed:
        choices = [a for a in allowed if a != "literal" and not isinstance(a, type)]
        if value in choices or (value is None and type(None) in allowed):
            return value
        raise ConfigError(f"--config.{key} must be one of {choices}, got {raw!r}")
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
        value = float(value) if int not in allowed else value
    else:
        ok = any(isinstance(value, a) for a in allowed if isinstance(a, type))
    if not ok:
        names = "/".join(getattr(a, "__name__", str(a)) for a in allowed)
        raise ConfigError(f"--config.{key} expects {names}, got {raw!r}")
    return value


def override(obj, key: str, raw: str, prefix: str = ""):
    """Return a copy of dataclass `obj` with dotted `key` set from the string `raw`."""
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    full = f"{prefix}{head}"
    if head not in fields:
        raise ConfigError(f"unknown config key {full!r}")
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown config key {full + '.' + rest!r}")
        return dataclasses.replace(obj, **{head: override(current, rest, raw, full + ".")})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full!r} is a section; set one of its fields")
    hints = typing.get_type_hints(type(obj))
    return dataclasses.replace(obj, **{head: _coerce(full, raw, hints[head])})


def apply_overrides(cfg, overrides):
    """cfg with every (dotted key, raw string) of `overrides` set, in order."""
    for key, raw in overrides:
        cfg = override(cfg, key, raw)
    return cfg


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate `--config.a.b=v` (or `--config.a.b v`) from the other arguments."""
    rest, over, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            if "=" in a:
                k, v = a[len("--config."):].split("=", 1)
            elif i + 1 < len(argv):
                k, v = a[len("--config."):], argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{a} needs a value")
            over.append((k, v))
        else:
            rest.append(a)
        i += 1
    return rest, over


def main_guard(fn):
    """Run fn(); print user errors (ConfigError and its subclasses, e.g. CheckpointError) as one
    line on stderr and exit 2 (no traceback)."""
    try:
        return fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
