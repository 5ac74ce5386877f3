"""One run configuration: YAML sections `data`, `model`, `train`, `tune`, `export`.

Read into frozen dataclasses. Precedence, lowest first: the defaults here, the run
directory's `config.yaml` (when a later stage runs on an existing run), `--config FILE`,
then each `--set section.key=value` in order. Unknown keys and bad values raise
`ConfigError` with a one-line message that names the key and what is allowed, before
any work starts.

Example:
    kcp train --config my.yaml --set train.epochs=3 --set model.filters=[16,32]
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from kcp.core.errors import UserError

# The registry lives in trainer.models (which imports Keras); the names are repeated here
# so that validating a config never imports TensorFlow. A test keeps the two equal.
MODEL_NAMES = ("cnn", "resnet", "rnn", "transformer")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.2), as users write learning rates."""


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


class ConfigError(UserError, ValueError):
    """A configuration key or value that is not allowed; the message is one line."""


def option(default: Any, *, choices=None, minimum=None, maximum=None, help: str = ""):
    """A dataclass field carrying its own validation rules."""
    metadata = {"choices": choices, "minimum": minimum, "maximum": maximum, "help": help}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a default_factory for mutable defaults")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OfflineAugmentConfig:
    """Augmented copies written by the pipeline (train split only), deterministic per key and copy."""

    copies: int = option(0, minimum=0, help="augmented copies per train example; 0 turns augmentation off")
    flip: bool = option(False, help="images: horizontal flip (off: digits and letters are not mirror-symmetric)")
    crop_padding: float = option(0.1, minimum=0.0, maximum=0.5, help="images: pad by this fraction, crop back")
    rotation: float = option(10.0, minimum=0.0, maximum=180.0, help="images: max degrees either way")
    brightness: float = option(0.1, minimum=0.0, maximum=1.0, help="images: max shift, fraction of 255")
    contrast: float = option(0.1, minimum=0.0, maximum=1.0, help="images: max relative contrast change")
    cutout: float = option(0.0, minimum=0.0, maximum=0.9, help="images: side of a zeroed square, fraction of the side")
    time_shift: float = option(0.1, minimum=0.0, maximum=0.9, help="sequences: max shift, fraction of the length")
    scale: float = option(0.1, minimum=0.0, maximum=0.9, help="sequences: max relative amplitude change")
    noise: float = option(0.05, minimum=0.0, help="sequences: noise std in units of each feature's std")
    token_delete: float = option(0.1, minimum=0.0, maximum=0.9, help="text: probability of deleting each token")
    token_swap: float = option(0.1, minimum=0.0, maximum=0.9, help="text: fraction of adjacent swaps")


@dataclass(frozen=True)
class DataConfig:
    source: str = option("digits", help="digits | folder:PATH | npz:PATH | csv:PATH | jsonl:PATH | tfds:NAME[:SPLIT]")
    split: tuple = option((0.8, 0.1, 0.1), help="train/validation/test fractions when the source has no splits")
    num_shards: int = option(0, minimum=0, help="shards per split; 0 picks from the data size")
    compression: str = option("none", choices=("none", "gzip"))
    seed: int = option(42, help="seed of the reproducible split")
    limit: int = option(0, minimum=0, help="read at most this many examples (0: all), for quick trials")
    modality: Optional[str] = option(None, choices=(None, "image", "sequence", "text"), help="npz: override")
    image_size: Optional[tuple] = option(None, help="[height, width]; null: the most common size")
    channels: Optional[int] = option(None, choices=(None, 1, 3), help="null: 3 if any image has colour, else 1")
    text_column: str = option("text")
    label_column: str = option("label")
    split_column: str = option("split", help="optional column with train/validation/test")
    vocab_size: int = option(20_000, minimum=3, help="text: largest vocabulary, padding and OOV ids included")
    min_count: int = option(2, minimum=1, help="text: least count of a token in the train split")
    max_length: Optional[int] = option(None, minimum=1, help="text: tokens per example; null: 95th percentile")
    tfds_data_dir: Optional[str] = option(None, help="tfds: where the prepared data lives")
    max_bad_fraction: float = option(0.01, minimum=0.0, maximum=1.0, help="fail when more inputs are unreadable")
    augment: OfflineAugmentConfig = field(default_factory=OfflineAugmentConfig)

    def __post_init__(self):
        split = self.split
        if len(split) != 3 or any(not 0 <= s <= 1 for s in split) or abs(sum(split) - 1) > 1e-6:
            raise ConfigError(f"data.split: {list(split)!r} must be three fractions (train, validation, test) summing to 1")
        if split[0] == 0:
            raise ConfigError("data.split: the train fraction must be above 0")
        if self.image_size is not None and (len(self.image_size) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.image_size)):
            raise ConfigError(f"data.image_size: {list(self.image_size)!r} must be [height, width] in pixels")


@dataclass(frozen=True)
class AugmentLayersConfig:
    """Online augmentation layers at the model's input: images only, active only in training."""

    flip: str = option("none", choices=("none", "horizontal", "vertical", "horizontal_and_vertical"))
    translation: float = option(0.0, minimum=0.0, maximum=1.0, help="fraction of height/width")
    rotation: float = option(0.0, minimum=0.0, maximum=1.0, help="fraction of a full turn")
    zoom: float = option(0.0, minimum=0.0, maximum=1.0)
    contrast: float = option(0.0, minimum=0.0, maximum=1.0)

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or any((self.translation, self.rotation, self.zoom, self.contrast))


@dataclass(frozen=True)
class ModelConfig:
    name: str = option("cnn", choices=MODEL_NAMES)
    dropout: float = option(0.1, minimum=0.0, maximum=0.95)
    initializer: Optional[str] = option(
        None, choices=(None, *INITIALIZERS),
        help="kernel initializer; null: he_normal for cnn/resnet (ReLU), glorot_uniform for rnn/transformer")
    augment: AugmentLayersConfig = field(default_factory=AugmentLayersConfig)
    # cnn
    filters: tuple = option((32, 64), help="cnn: filters per convolution block")
    kernel_size: int = option(3, minimum=1, help="cnn: kernel size")
    convs_per_block: int = option(2, minimum=1, help="cnn: convolutions per block")
    batch_norm: bool = option(True, help="cnn: batch normalization after each convolution")
    sync_batch_norm: Optional[bool] = option(
        None, help="batch statistics across replicas; null: on when training on 2+ replicas (TF backend)")
    # resnet
    depth: int = option(20, minimum=8, help="resnet: 6n+2 (20, 32, 44, 56, 110) CIFAR-style; 18, 34, 50, 101, 152 ImageNet-style")
    version: int = option(1, choices=(1, 2), help="resnet: 1 (post-activation) or 2 (pre-activation)")
    width: int = option(0, minimum=0, help="resnet: base filters; 0: 16 CIFAR-style, 64 ImageNet-style")
    # rnn
    cell: str = option("lstm", choices=("simple", "lstm", "gru"), help="rnn: recurrent cell")
    units: int = option(128, minimum=1, help="rnn: units per layer")
    bidirectional: bool = option(False, help="rnn: bidirectional layers")
    # rnn and transformer
    layers: int = option(2, minimum=1, help="rnn: stacked layers; transformer: encoder blocks")
    # transformer
    heads: int = option(4, minimum=1, help="transformer: attention heads")
    dim: int = option(64, minimum=1, help="transformer: model width; rnn/cnn on text: embedding size")
    mlp_dim: int = option(128, minimum=1, help="transformer: feed-forward width")
    positional: str = option("sinusoidal", choices=("sinusoidal", "learned"), help="transformer: position encoding")
    patch_size: int = option(0, minimum=0, help="transformer on images: patch side; 0: the side that gives 8x8 patches")
    pooling: str = option("mean", choices=("mean", "cls"), help="transformer: mean of tokens or a class token")

    def __post_init__(self):
        if self.name == "transformer" and self.dim % self.heads:
            raise ConfigError(f"model.dim: {self.dim} is not divisible by model.heads ({self.heads})")
        if self.name == "resnet":
            from_depth = resnet_style(self.depth)
            if from_depth is None:
                raise ConfigError(f"model.depth: {self.depth} is not a ResNet depth; allowed: 6n+2 "
                                  f"(20, 32, 44, 56, 110) or {', '.join(map(str, IMAGENET_RESNET_DEPTHS))}")


IMAGENET_RESNET_DEPTHS = (18, 34, 50, 101, 152)


def resnet_style(depth: int) -> Optional[str]:
    """'imagenet' for 18/34/50/101/152, 'cifar' for other depths 6n+2, None otherwise."""
    if depth in IMAGENET_RESNET_DEPTHS:
        return "imagenet"
    if depth >= 8 and (depth - 2) % 6 == 0:
        return "cifar"
    return None


STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
SCHEDULES = ("constant", "step", "cosine", "plateau")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(30, minimum=1)
    batch_size: int = option(64, minimum=1, help="per replica; the global batch is batch_size x replicas")
    optimizer: str = option("adam", choices=OPTIMIZERS)
    learning_rate: float = option(1e-3, minimum=0.0, help="peak learning rate (after warmup)")
    momentum: float = option(0.9, minimum=0.0, maximum=1.0, help="for the momentum and nesterov optimizers")
    weight_decay: float = option(0.0, minimum=0.0, help="decoupled weight decay; 0 turns it off")
    schedule: str = option("cosine", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, minimum=0.0, help="cosine: linear warmup from 0, at most half the run")
    decay_epochs: int = option(10, minimum=1, help="step: epochs between decays")
    decay_rate: float = option(0.1, minimum=0.0, maximum=1.0, help="step and plateau: factor per decay")
    plateau_patience: int = option(3, minimum=1, help="plateau: epochs without improvement before a decay")
    clip_norm: float = option(0.0, minimum=0.0, help="gradient clipping by global norm; 0 turns it off")
    label_smoothing: float = option(0.0, minimum=0.0, maximum=0.5)
    precision: str = option("float32", choices=PRECISIONS, help="mixed_* for GPUs/TPUs; bf16 is ~7x slower on CPU")
    jit_compile: Optional[bool] = option(None, help="XLA; null: Keras decides (on for GPU/TPU, off on CPU)")
    steps_per_execution: int = option(1, minimum=1)
    early_stopping_patience: int = option(0, minimum=0, help="epochs without improvement; 0 turns it off")
    monitor: str = option("val_accuracy", help="metric for early stopping, the best checkpoint and plateau")
    strategy: str = option("auto", choices=STRATEGIES)
    cpu_devices: int = option(0, minimum=0, help="split the CPU into N logical devices (try mirrored without GPUs)")
    seed: int = option(42)
    shuffle_buffer: int = option(10_000, minimum=1)
    cache: bool = option(True, help="keep the serialized records in memory after the first epoch")
    deterministic: bool = option(False, help="deterministic input order and ops (slower; for tests)")
    include_validation: bool = option(False, help="fit on train + validation (the final run after tuning)")

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate: {self.learning_rate!r} must be above 0")

    @property
    def monitor_mode(self) -> str:
        return "min" if "loss" in self.monitor else "max"


@dataclass(frozen=True)
class TuneConfig:
    algorithm: str = option("random", choices=("random", "grid", "hyperband", "bayesian"))
    max_trials: int = option(10, minimum=1, help="trials (hyperband sizes its brackets from train.epochs instead)")
    objective: str = option("val_accuracy")
    direction: str = option("max", choices=("min", "max"))
    executions_per_trial: int = option(1, minimum=1)
    early_stopping_patience: int = option(3, minimum=0, help="epochs without improvement inside a trial; 0 off")
    space: dict = option(None, help="config key -> [choices] or {min, max, step, sampling}; null: the family's default")
    retrain_best: bool = option(False, help="retrain the best config on train + validation and export it")


@dataclass(frozen=True)
class ExportConfig:
    name: str = option("model", help="model name in RUN/export/NAME/VERSION and in the serving URL")
    min_accuracy: Optional[float] = option(None, minimum=0.0, maximum=1.0)

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"export.name: {self.name!r} must be a plain directory name")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _describe(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _coerce(key: str, value: Any, annotation: Any):
    """Checks `value` against a field's annotation; returns it in the field's type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else _coerce(key, value, inner)
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


def _check_rules(key: str, value: Any, metadata) -> None:
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join("null" if choice is None else str(choice) for choice in choices)
        raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        minimum, maximum = metadata.get("minimum"), metadata.get("maximum")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}: {value!r} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{key}: {value!r} is above the maximum {maximum}")


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {_describe(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        kind = "key" if prefix else "section"
        raise ConfigError(f"{where}{unknown[0]}: unknown {kind}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value if value is not None else {}, key)
            continue
        value = _coerce(key, value, annotation)
        _check_rules(key, value, fields[name].metadata)
        kwargs[name] = value
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
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
    from kcp.core import storage

    if not storage.exists(path):
        raise ConfigError(f"{path}: file not found")
    try:
        values = load_yaml(storage.read_text(path)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping with sections data, model, train, tune, export")
    return values


def load_config(layers: list[dict] = (), overrides: list[str] = ()) -> Config:
    """Builds a Config from dict layers (lowest precedence first) and --set overrides."""
    values: dict = {}
    for layer in layers:
        values = _merge(values, layer)
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(Config, values, "")
