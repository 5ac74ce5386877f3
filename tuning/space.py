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

import itertools
import json
import math

import trainer.models  # noqa: F401  registers the model families, whose keys the config loader validates
from kcp.core.config import Config, ConfigError
from kcp.core.families import MODEL_FAMILIES
from kcp.core.config_load import load_config


MAX_CHECKED_COMBINATIONS = 4096  # a space with more is checked key by key only


def search_space(config: Config) -> dict:
    """`tune.space`, or the family's default space; every key checked against the config: its
    section (data keys are fixed by the preprocessed data, which no trial changes), its name (a
    nested key such as model.augment.zoom too), and every combination of values, for spaces of up to
    MAX_CHECKED_COMBINATIONS (model.dim must divide by model.heads), else every value."""
    space = dict(config.tune.space) if config.tune.space else dict(MODEL_FAMILIES[config.model.name].search_space)
    plain = config.to_dict()
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if section == "data":
            raise ConfigError(f"tune.space: {key!r} is fixed by the preprocessed data (RUN/data), which a trial "
                              "does not change; search model and train keys, and preprocess once per data setting")
        if section not in ("model", "train") or not name:
            raise ConfigError(f"tune.space: {key!r} is not a model or train key")
        if key == "train.include_validation":  # a trial is scored on the validation split it would fit on
            raise ConfigError("tune.space: 'train.include_validation' is false in every trial, which is scored on "
                              "the validation split; tune.retrain_best then trains the best on train + validation")
        if key == "train.epochs" and config.tune.algorithm == "hyperband":
            raise ConfigError("tune.space: 'train.epochs' is set by hyperband, whose brackets give each trial its "
                              "epochs (up to train.epochs); search it with random, grid or bayesian")
        if isinstance(spec, list):
            check_choices(key, spec)
        elif isinstance(spec, dict):
            check_range(key, spec)
        else:
            raise ConfigError(f"tune.space.{key}: expected a list of choices or a {{min, max}} range")
    # every value must also be a valid config value (the key one of the family's): fail before the first
    # trial; in every combination where there are few enough (each value alone, set beside the base
    # config's values of the other searched keys, could be refused for a pairing no trial makes)
    if math.prod(len(candidates(spec)) for spec in space.values()) <= MAX_CHECKED_COMBINATIONS:
        for values in itertools.product(*(candidates(spec) for spec in space.values())):
            checked(plain, dict(zip(space, values)))
    else:
        for key, spec in space.items():
            for value in candidates(spec):
                checked(plain, {key: value})
    return space


def planned_trials(config: Config) -> int:
    """The trials a random, grid or bayesian search runs: tune.max_trials, or fewer for a grid of
    choices (its size; a grid with ranges is sized by Keras Tuner as it walks it)."""
    if config.tune.algorithm != "grid":
        return config.tune.max_trials
    specs = list(search_space(config).values())
    if all(isinstance(spec, list) for spec in specs):
        return min(config.tune.max_trials, math.prod(len(spec) for spec in specs))
    return config.tune.max_trials


def candidates(spec) -> list:
    """The values of a hyperparameter that are checked: every choice, or a range's ends."""
    return list(spec) if isinstance(spec, list) else [spec["min"], spec["max"]]


def checked(plain: dict, values: dict) -> None:
    """`plain` with `values` ({key: value}) applied must load, or a one-line tune.space error."""
    try:
        load_config([plain], [f"{key}={json.dumps(value)}" for key, value in values.items()])
    except ConfigError as error:
        together = f" (with {', '.join(f'{k}={json.dumps(v)}' for k, v in values.items())})" if len(values) > 1 else ""
        raise ConfigError(f"tune.space: {error}{together}") from None


RANGE_KEYS = ("min", "max", "step", "sampling")


def check_choices(key: str, spec: list) -> None:
    """A choice: plain values of one type (Keras Tuner's hp.Choice takes nothing else), each once."""
    if not spec or any(isinstance(v, (list, dict)) for v in spec):
        raise ConfigError(f"tune.space.{key}: a choice needs a non-empty list of plain values")
    for value in spec:
        if value is None or not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"tune.space.{key}: choice {value!r} is not a number, string or boolean")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"tune.space.{key}: choice {value!r} must be a finite number")
    types = {type(v) for v in spec}
    if len(types) > 1:
        hint = " (write the integers as floats, e.g. 1.0)" if types == {int, float} else ""
        raise ConfigError(f"tune.space.{key}: choices {spec!r} mix {' and '.join(sorted(t.__name__ for t in types))} "
                          f"values{hint}; a choice takes one type")
    seen = []
    for value in spec:
        if value in seen:
            raise ConfigError(f"tune.space.{key}: choice {value!r} is listed twice in {spec!r}")
        seen.append(value)


def check_range(key: str, spec: dict) -> None:
    """A range: numeric min below max, an optional step above 0 (above 1 with log sampling, where
    it is a factor) and a sampling Keras Tuner knows; no other keys."""
    unknown = sorted(str(k) for k in spec if k not in RANGE_KEYS)
    if unknown:
        raise ConfigError(f"tune.space.{key}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)} in a range; a range takes min, max, step, sampling")
    if "min" not in spec or "max" not in spec:
        raise ConfigError(f"tune.space.{key}: a range needs min and max (and optionally step, sampling)")
    for name in ("min", "max", "step"):
        if name == "step" and spec.get("step") is None:
            continue  # no step (null): continuous
        value = spec[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"tune.space.{key}: {name} {value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"tune.space.{key}: {name} {value!r} must be a finite number")
    if spec["min"] >= spec["max"]:
        raise ConfigError(f"tune.space.{key}: min {spec['min']} must be below max {spec['max']}")
    sampling = spec.get("sampling") or "linear"
    if sampling not in ("linear", "log", "reverse_log"):
        raise ConfigError(f"tune.space.{key}: sampling {sampling!r} must be linear, log or reverse_log")
    step = spec.get("step")
    if step is not None and step <= 0:
        raise ConfigError(f"tune.space.{key}: step {step} must be above 0")
    if sampling != "linear":
        if spec["min"] <= 0:
            raise ConfigError(f"tune.space.{key}: min {spec['min']} must be above 0 with sampling {sampling}")
        if step is not None and step <= 1:
            raise ConfigError(f"tune.space.{key}: step {step} must be above 1 with sampling {sampling} "
                              "(it is a factor there)")


def hyperparameter(hp, key: str, spec):
    """One config key's hyperparameter: Choice for lists, Int or Float for ranges."""
    if isinstance(spec, list):
        return hp.Choice(key, spec)
    sampling, step = spec.get("sampling") or "linear", spec.get("step")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (spec["min"], spec["max"], step or 1)):
        # no step: Keras Tuner takes every integer (linear), or any factor (log)
        return hp.Int(key, spec["min"], spec["max"], step=step, sampling=sampling)
    return hp.Float(key, float(spec["min"]), float(spec["max"]), step=step, sampling=sampling)


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
