"""Dotted keys of a dataclass config tree: overrides from the command line
(`algorithm.rlrt.alpha=0.5`), values coerced to each field's type, construction from a dict, and
each key's documentation (`rlrt train --help-config`). Generic over the dataclasses; the schema is
`schema.py`'s `TrainConfig`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal

from rlrt_megatron.algorithms import ALGORITHMS


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted key and the fix."""


def all_keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf dotted key of a config class -> its field."""
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(all_keys(tp, key + "."))
        else:
            out[key] = f
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a command-line string (or a python value) to the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)} (got {value!r})")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = (
                json.loads(value)
                if value.strip().startswith("[")
                else [v for v in value.split(",") if v]
            )
        return [_coerce(v, inner, key) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: cannot read {value!r} as {getattr(tp, '__name__', tp)}"
        ) from None
    return value


def apply_overrides(cfg: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """Set dotted keys: `["algorithm.rlrt.alpha=0.5", "train.steps=3"]` or a dict.

    Values are coerced to the field's type; an unknown key raises `ConfigError` listing close
    matches.
    """
    items = (
        list(overrides.items())
        if isinstance(overrides, dict)
        else [_split_override(s) for s in overrides]
    )
    keys = all_keys(type(cfg))
    for key, value in items:
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{key}: unknown config key{hint}")
        *path, leaf = key.split(".")
        obj: Any = cfg
        for part in path:
            obj = getattr(obj, part)
        tp = typing.get_type_hints(type(obj))[leaf]
        setattr(obj, leaf, _coerce(value, tp, key))
    return cfg


def _split_override(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise ConfigError(f"{s}: overrides look like `dotted.key=value` (e.g. train.steps=10)")
    k, v = s.split("=", 1)
    return k.strip(), v


def _from_dict(cls: type, d: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        k = sorted(unknown)[0]
        close = difflib.get_close_matches(k, sorted(names), n=3)
        raise ConfigError(
            f"{prefix}{k}: unknown config key"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def field_help(cls: type, key: str) -> str:
    """The documentation of dotted `key`: the field's `help` metadata, else the `Attributes:`
    entry of its class docstring (the algorithm configs document fields there)."""
    *path, leaf = key.split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    f = {f.name: f for f in dataclasses.fields(cls)}[leaf]
    if "help" in f.metadata:
        return f.metadata["help"]
    if key == "algorithm.name":
        return f"Algorithm from rlrt_megatron.algorithms.ALGORITHMS: {', '.join(ALGORITHMS)}."
    for klass in cls.__mro__:
        lines = (klass.__doc__ or "").splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            names = stripped.split(":", 1)[0]
            if ":" in stripped and leaf in [n.strip() for n in names.split(",")]:
                text = [stripped.split(":", 1)[1].strip()]
                for nxt in lines[i + 1 :]:
                    if not nxt.strip() or ":" in nxt.split()[0]:
                        break
                    text.append(nxt.strip())
                return " ".join(text)
    return ""


def describe(cls: type) -> str:
    """Every dotted key with its type, default and meaning (for `rlrt train --help-config`)."""
    lines = []
    default = cls()
    for key in all_keys(cls):
        obj: Any = default
        for part in key.split("."):
            obj = getattr(obj, part)
        lines.append(f"{key} = {obj!r}\n    {field_help(cls, key)}")
    return "\n".join(lines)
