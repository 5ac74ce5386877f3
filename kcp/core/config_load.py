"""A run's config from its layers: the defaults (kcp/core/config.py), the run's recorded
`config.yaml`, `--config FILE`, `--source`/`--model`, then each `--set section.key=value`.

`load_config` merges dict layers and overrides into a validated `Config`; `resolve_config` is
what a command runs with (it reads RUN/config.yaml); `record_config` writes it back, with the
applied defaults spelled out, so a later stage on the same run reads what this one used.

    from kcp.core.config_load import load_config
    config = load_config([{"model": {"name": "resnet"}}], ["train.epochs=3"])
"""

from __future__ import annotations

import contextlib
import json

from kcp.core import storage
from kcp.core.config import DEFAULT_LANGUAGE_SOURCE, Config, ModelConfig, is_language_source
from kcp.core.errors import UserError
from kcp.core.families import MODEL_FAMILIES, families_for
from kcp.core.layout import RunLayout
from kcp.core.schema import ConfigError, build, merge, parse_override, read_yaml_file


# data keys that describe one source's inputs: a recorded config loses them when a later stage
# names another data.source (an npz's data.modality must not turn the next folder into sequences)
SOURCE_KEYS = frozenset({"modality", "image_size", "channels", "text_column", "label_column", "split_column",
                         "limit", "tfds_data_dir"})


def load_config(layers: list[dict] = (), overrides: list[str] = (), *, base: dict | None = None) -> Config:
    """Builds a Config from dict layers (lowest precedence first) and --set overrides.

    `base` is a config recorded earlier (a run's config.yaml, the config a tuning trial
    starts from), below every layer. When the layers choose another model family, the
    recorded family's own keys are dropped: they describe a model no longer asked for. Likewise
    the recorded data.tokenizer when the layers switch between language and other sources, and
    the recorded SOURCE_KEYS when the layers name another data.source.
    A language family (gpt) with no data.source in any layer or the base reads
    DEFAULT_LANGUAGE_SOURCE (python-stdlib), so `kcp run --model gpt` works with no data; and a
    language source (text:PATH, python-stdlib) with no model.name anywhere trains the language family.

    A family's `training_defaults` (a ClassVar of its config dataclass, e.g. gpt's AdamW, warmup
    and cosine, clipping, `val_loss`) lie above the shared defaults and below the base and the
    layers. When the family changes, the base loses every key the old or the new family has a
    training default for, so the new family's (or the shared) defaults apply rather than the old
    family's; between two families with no training defaults (cnn -> rnn) every shared key stays.
    """
    values: dict = {}
    for layer in layers:
        values = merge(values, layer)
    for text in overrides:
        values = merge(values, parse_override(text))
    if base:
        base_model = dict(base.get("model") or {})
        base_data, data = base.get("data"), values.get("data")
        switched = isinstance(base_data, dict) and isinstance(data, dict) and isinstance(data.get("source"), str) \
            and isinstance(base_data.get("source"), str) and \
            is_language_source(data["source"]) != is_language_source(base_data["source"])
        chosen = (values.get("model") or {}).get("name", base_model.get("name"))
        named = isinstance(values.get("model"), dict) and "name" in values["model"]
        if switched and not named and families_for("language"):  # a corpus after digits (or back): the recorded
            chosen = families_for("language")[0] if is_language_source(data["source"]) else ModelConfig.name  # family
            values = merge(values, {"model": {"name": chosen}})  # cannot take it; the source's own default family
        if chosen != base_model.get("name"):
            base = {**base, "model": {k: v for k, v in base_model.items() if k in ModelConfig.shared_keys()}}
            base = drop_keys(base, family_default_keys(*(MODEL_FAMILIES.get(name) for name in
                                                         (base_model.get("name"), chosen) if isinstance(name, str))))
        if isinstance(base_data, dict) and isinstance(data, dict) and "source" in data and \
                data["source"] != base_data.get("source"):  # what described the earlier source's inputs
            base = {**base, "data": {k: v for k, v in base_data.items() if k not in SOURCE_KEYS
                                     and not (switched and k == "tokenizer")}}
        values = merge(base, values)
    model, data = values.get("model") or {}, values.get("data") or {}
    if isinstance(model, dict) and "name" not in model and isinstance(data, dict) and \
            isinstance(data.get("source"), str) and is_language_source(data["source"]) and families_for("language"):
        values = merge(values, {"model": {"name": families_for("language")[0]}})  # a corpus: gpt, as gpt: a corpus
        model = values["model"]
    name = model.get("name", ModelConfig.name) if isinstance(model, dict) else None
    family = MODEL_FAMILIES.get(name) if isinstance(name, str) else None
    if family is not None:
        values = merge(dict(getattr(family, "training_defaults", {})), values)
    data = values.get("data") or {}
    if isinstance(data, dict) and "source" not in data and family is not None and \
            "language" in getattr(family, "modalities", ()):
        values = merge(values, {"data": {"source": DEFAULT_LANGUAGE_SOURCE}})
    return build(Config, values, "")


def family_default_keys(*families) -> dict:
    """{section: {key, ...}} of every key one of `families` (config classes; None is skipped) has a
    training default for: what a recorded config loses when the run leaves the one family for the
    other, so that neither family's defaults ride along and a user's keys the two share survive."""
    keys: dict = {}
    for family in families:
        for section, values in getattr(family, "training_defaults", {}).items():
            keys.setdefault(section, set()).update(values)
    return keys


def drop_keys(values: dict, keys: dict) -> dict:
    """`values` without the {section: {key, ...}} `keys`."""
    return {section: ({k: v for k, v in content.items() if k not in keys[section]}
                      if section in keys and isinstance(content, dict) else content)
            for section, content in values.items()}


def override_list(overrides) -> list[str]:
    """`overrides` as "section.key=value" strings: a list or tuple of them as it is, one string as a
    list of one, a mapping {"train.epochs": 5} as "train.epochs=5" each (values as YAML reads JSON)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, dict):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"overrides: {overrides!r} is not a list of 'section.key=value' strings")
    listed = []
    for item in overrides:  # a list may mix the two: ["train.epochs=5", {"model.dropout": 0.2}]
        if isinstance(item, dict):
            listed.extend(override_list(item))
        elif isinstance(item, str):
            listed.append(item)
        else:
            raise ConfigError(f"overrides: {item!r} is neither a 'section.key=value' string nor a "
                              "{'section.key': value} mapping")
    return listed


def resolve_config(run_dir: str | None, config_file: str | None = None, source: str | None = None,
                   model: str | None = None, overrides=(), data_fixed: bool = False) -> Config:
    """What a command runs with: defaults <- RUN/config.yaml <- `config_file` <- `source`/`model`
    <- `overrides` ("section.key=value"), in that order. `data_fixed` (train, tune): an override of
    a data key that differs from what RUN/data was preprocessed with is refused, not recorded."""
    recorded = None
    if run_dir and storage.exists(RunLayout(run_dir).config):
        recorded = read_yaml_file(RunLayout(run_dir).config)
    layers = [read_yaml_file(config_file)] if config_file else []
    if source is not None and not isinstance(source, str):  # a DataFrame or an array has no truth value
        raise ConfigError(f"data.source: expected a source such as csv:PATH or npz:PATH, got a "
                          f"{type(source).__name__} (save it first, e.g. DataFrame.to_csv or numpy.savez)")
    if source:
        layers.append({"data": {"source": source}})
    if model:
        layers.append({"model": {"name": model}})
    try:
        config = load_config(layers, override_list(overrides), base=recorded)
        if data_fixed and recorded is not None:
            check_data_unchanged(config, load_config(base=recorded), override_list(overrides), run_dir)
        return config
    except ConfigError as error:
        if recorded is not None and not str(error).startswith(RunLayout(run_dir).config):
            try:  # the run's own config.yaml holds the bad value: name the file, which the user never typed
                load_config(base=recorded)
            except ConfigError as recorded_error:
                if str(recorded_error) == str(error):
                    raise ConfigError(f"{RunLayout(run_dir).config}: {error}") from None
        if config_file and not str(error).startswith(config_file):
            try:  # the --config file holds it: name the file, as its YAML errors do
                load_config(layers[:1], base=recorded)
            except ConfigError as file_error:
                if str(file_error) == str(error):
                    raise ConfigError(f"{config_file}: {error}") from None
        raise


def check_data_unchanged(config: Config, recorded: Config, overrides: list[str], run_dir: str) -> None:
    """Refuses a `data.*` override whose value differs from the run's recorded one: the data are
    already preprocessed, so training would silently ignore it while config.yaml recorded it."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if not key.startswith("data."):
            continue
        new, old = config, recorded
        for part in key.split("."):
            new, old = getattr(new, part, None), getattr(old, part, None)
        if new != old:
            raise ConfigError(f"{key}: {new!r}, but {run_dir}/data was preprocessed with {old!r}; data keys apply "
                              f"when preprocessing: kcp preprocess --run-dir {run_dir} --set {key}=..., then train")


def record_config(run_dir: str, config: Config) -> None:
    """RUN/config.yaml: the resolved config of the last stage that produced something, with the
    applied defaults written out (data.source for gpt, data.tokenizer), so a rerun reads them."""
    storage.makedirs(run_dir)
    storage.write_text_atomic(RunLayout(run_dir).config, config.to_yaml())


@contextlib.contextmanager
def config_recorded(run_dir: str, config: Config, helper: bool = False):
    """Records `config` (record_config) for the body, which may read it back (a killed stage's rerun
    resumes with it); a body that fails with a one-line error (a strategy with no TPU, a family that
    does not take the data, a NaN stop) puts back the config.yaml that was there before, so that
    later commands do not inherit the settings of a command that failed. Not by a `helper` (a tuner
    worker or a multi_worker non-chief, as `locked` has it): the chief, which holds the run's lock,
    records config.yaml; a helper with other keys would overwrite the chief's."""
    if helper:
        yield
        return
    path = RunLayout(run_dir).config
    before = storage.read_text(path) if storage.exists(path) else None
    record_config(run_dir, config)
    try:
        yield
    except UserError:
        if before is None:
            storage.remove(path)
        else:
            storage.write_text_atomic(path, before)
        raise
