"""Search spaces: dotted config keys mapped to hyperparameters, and a trial's config.

A space maps config keys to hyperparameters (YAML under `tune.space`):

    tune:
      space:
        model.depth: [20, 32]                                        # hp.Choice
        train.learning_rate: {min: 1.0e-4, max: 1.0e-1, sampling: log}  # hp.Float
        model.units: {min: 32, max: 256, step: 32}                   # hp.Int
        model.dropout: {min: 0.0, max: 0.5, step: 0.1}               # hp.Float

Without one, the model family's default space is searched: `search_space` on the family's
config dataclass, beside its builder (trainer/models/<family>.py).
"""

from __future__ import annotations

import json

import trainer.models  # noqa: F401  registers the model families, whose keys the config loader validates
from kcp.core.config import MODEL_FAMILIES, Config, ConfigError
from kcp.core.config_load import load_config


def search_space(config: Config) -> dict:
    """`tune.space`, or the family's default space; every key checked against the config."""
    space = dict(config.tune.space) if config.tune.space else dict(MODEL_FAMILIES[config.model.name].search_space)
    plain = config.to_dict()
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if section not in ("data", "model", "train") or name not in plain.get(section, {}):
            raise ConfigError(f"tune.space: {key!r} is not a data, model or train key")
        if isinstance(spec, list):
            if not spec or any(isinstance(v, (list, dict)) for v in spec):
                raise ConfigError(f"tune.space.{key}: a choice needs a non-empty list of plain values")
        elif isinstance(spec, dict):
            unknown = set(spec) - {"min", "max", "step", "sampling"}
            if unknown or "min" not in spec or "max" not in spec:
                raise ConfigError(f"tune.space.{key}: a range needs min and max (and optionally step, sampling)")
            if spec["min"] >= spec["max"]:
                raise ConfigError(f"tune.space.{key}: min {spec['min']} must be below max {spec['max']}")
            if spec.get("sampling", "linear") not in ("linear", "log", "reverse_log"):
                raise ConfigError(f"tune.space.{key}: sampling must be linear, log or reverse_log")
        else:
            raise ConfigError(f"tune.space.{key}: expected a list of choices or a {{min, max}} range")
        # every value must also be a valid config value: fail before the first trial
        for value in (spec if isinstance(spec, list) else [spec["min"], spec["max"]]):
            load_config([plain], [f"{key}={json.dumps(value)}"])
    return space


def hyperparameter(hp, key: str, spec):
    """One config key's hyperparameter: Choice for lists, Int or Float for ranges."""
    if isinstance(spec, list):
        return hp.Choice(key, spec)
    sampling = spec.get("sampling", "linear")
    if all(isinstance(spec.get(k, 1), int) and not isinstance(spec.get(k, 1), bool) for k in ("min", "max", "step")):
        return hp.Int(key, spec["min"], spec["max"], step=spec.get("step", 1), sampling=sampling)
    return hp.Float(key, float(spec["min"]), float(spec["max"]), step=spec.get("step"), sampling=sampling)


def native(value, spec):
    """A hyperparameter value as the config wants it: Python types, and bools kept bools
    (Keras Tuner hands boolean choices back as 0/1 in some algorithms)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(spec, list) and spec and all(isinstance(choice, bool) for choice in spec):
        return bool(value)
    return value


def trial_config(config: Config, values: dict, space: dict | None = None) -> Config:
    """The base config with a trial's values applied (validated like --set)."""
    space = space or {}
    return load_config([config.to_dict()], [f"{key}={json.dumps(native(value, space.get(key)))}"
                                            for key, value in values.items()])
