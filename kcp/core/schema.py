"""The machinery of the config: fields that carry their own rules, YAML reading, and building
typed dataclasses from plain values with one-line errors that name the key.

The sections themselves (data, model, train, tune, export) are in kcp/core/config.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import field
from typing import Any

import yaml

from kcp.core import storage
from kcp.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value that is not allowed; the message is one line."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.2), as users write learning rates, and
    refuses a key written twice in one mapping (PyYAML keeps the last one silently; YAML 1.2 says a
    mapping's keys are unique)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, as YAML allows, once or more
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)):
                if (type(key), key) in seen:  # by type too: 1 and true are two keys
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found duplicate key {key!r} (line {key_node.start_mark.line + 1}): "
                        "write each key once", key_node.start_mark)
                seen.add((type(key), key))
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str):
    """Parses YAML text the way every config value is read."""
    return yaml.load(text, Loader=_YamlLoader)


def option(default: Any, *, choices=None, minimum=None, maximum=None, help: str = ""):
    """A dataclass field carrying its own validation rules."""
    metadata = {"choices": choices, "minimum": minimum, "maximum": maximum, "help": help}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a default_factory for mutable defaults")
    return field(default=default, metadata=metadata)


def to_plain(value):
    """A config dataclass as plain YAML-ready values (tuples become lists)."""
    if hasattr(value, "to_plain"):  # a section with a layout of its own (the flat model section)
        return value.to_plain()
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value


def describe(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def coerce(key: str, value: Any, annotation: Any):
    """Checks `value` against a field's annotation; returns it in the field's type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else coerce(key, value, inner)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a boolean (true or false)")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        if not math.isfinite(value):  # NaN passes every minimum/maximum comparison: it would switch rules off
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    if annotation is dict:
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: {value!r} is not a mapping of keys to values")
        return dict(value)
    if annotation is tuple:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, (list, dict)) for v in value):
            raise ConfigError(f"{key}: {value!r} is not a list of values")
        return tuple(value)
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def allowed(choices) -> str:
    return ", ".join("null" if choice is None else str(choice) for choice in choices)


def check_rules(key: str, value: Any, metadata) -> None:
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {allowed(choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        minimum, maximum = metadata.get("minimum"), metadata.get("maximum")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}: {value!r} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{key}: {value!r} is above the maximum {maximum}")


def build(cls, values: dict, prefix: str, **extra):
    """`cls` from a mapping of YAML values; every key and value checked, errors naming `prefix.key`.

    A section class with a `from_values(values, prefix)` classmethod builds itself (the flat
    model section); `extra` are fields given directly, not read from `values`.
    """
    if hasattr(cls, "from_values") and not extra:
        return cls.from_values(values, prefix)
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {describe(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        kind = "key" if prefix else "section"
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown {kind}; {hint}allowed: {', '.join(fields)}")
    kwargs = dict(extra)
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = build(annotation, value if value is not None else {}, key)
            continue
        try:
            value = coerce(key, value, annotation)
        except ConfigError as error:  # `flip: true` for a key of choices: say which
            choices = fields[name].metadata.get("choices")
            if choices is None:
                raise
            raise ConfigError(f"{error}; allowed: {allowed(choices)}") from None
        check_rules(key, value, fields[name].metadata)
        kwargs[name] = value
    return cls(**kwargs)


WHOLE_VALUES = ("space",)  # mappings that are one value (tune.space): a later layer replaces them, not adds to them


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in WHOLE_VALUES:
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """`section.key=value` -> {"section": {"key": value}}, the value read as YAML."""
    path, sep, raw = text.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=3")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error.problem})") from None
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def read_yaml_file(path: str) -> dict:
    if not storage.exists(path):
        raise ConfigError(f"{path}: file not found")
    try:
        values = load_yaml(storage.read_text(path)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping with sections data, model, train, tune, export")
    return values
