"""One run configuration: YAML sections `data`, `model`, `train`, `tune`, `export`.

Read into frozen dataclasses. Precedence, lowest first: the defaults here, the run
directory's `config.yaml` (when a later stage runs on an existing run), `--config FILE`,
then each `--set section.key=value` in order. Unknown keys and bad values raise
`ConfigError` with a one-line message that names the key and what is allowed, before
any work starts.

The `model` section is flat in YAML (`model: {name: resnet, depth: 56, dropout: 0.1}`): the
keys every family shares are defined here; each family's own keys are defined by a dataclass
beside its builder (trainer/models/<family>.py), registered with `@model_family(NAME)`
(kcp/core/families.py), and
validated by it. This module imports no stage: the front and the trainer import
`trainer.models`, which registers the families, before they load a config.

Example:
    kcp train --config my.yaml --set train.epochs=3 --set model.filters=[16,32]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from kcp.core.char_ngrams import DEFAULT_CHAR_NGRAM_BUCKETS, DEFAULT_CHAR_NGRAMS
from kcp.core.contract import (BYTE_VOCAB_SIZE, DEFAULT_TEXT_TOKENIZER, LANGUAGE_RESERVED_IDS, LANGUAGE_TOKENIZERS,
                               TEXT_TOKENIZERS, TOKENIZERS)
from kcp.core.families import family_config_class
from kcp.core.schema import ConfigError, build, coerce, option, parse_override, read_yaml_file, to_plain

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "TuneConfig", "ExportConfig",
           "option", "parse_override", "read_yaml_file",
           "is_language_source"]

# Sources whose documents are language-modelling data (modality `language`, kcp/core/sources/corpus.py),
# the families that train on it, and the source they get when data.source is not set.
LANGUAGE_SOURCE_KINDS = ("text", "python-stdlib")
DEFAULT_LANGUAGE_SOURCE = "python-stdlib"
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal")
DEFAULT_DROPOUT = 0.1  # model.dropout: null


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


MAX_IMAGE_SIDE = 4096  # data.image_size: each image is resized to it in memory, in every Beam worker


@dataclass(frozen=True)
class DataConfig:
    source: str = option("digits", help="digits | folder:PATH | npz:PATH | csv:PATH | jsonl:PATH | tfds:NAME[:SPLIT] "
                                        "| text:PATH | python-stdlib; not set and model.name gpt: python-stdlib")
    split: tuple = option((0.8, 0.1, 0.1), help="train/validation/test fractions when the source has no splits")
    num_shards: int = option(0, minimum=0, help="shards per split; 0 picks from the data size")
    compression: str = option("none", choices=("none", "gzip"))
    seed: int = option(42, help="seed of the reproducible split")
    limit: int = option(0, minimum=0, help="read at most this many examples (0: all), for quick trials")
    modality: Optional[str] = option(None, choices=(None, "image", "sequence", "text"), help="npz: override")
    image_size: Optional[tuple] = option(None, help="[height, width]; null: the most common, at most 256 a side")
    channels: Optional[int] = option(None, choices=(None, 1, 3), help="null: 3 if any image has colour, else 1")
    text_column: str = option("text")
    label_column: str = option("label")
    split_column: str = option("split", help="optional column with train/validation/test")
    vocab_size: int = option(20_000, minimum=3, help="text: largest vocabulary, padding and OOV ids included")
    min_count: int = option(2, minimum=1, help="text: least count of a token in the train split")
    tokenizer: Optional[str] = option(
        None, choices=(None, *TOKENIZERS),
        help="text: words (punctuation stripped), words_and_punctuation, or characters; language: bytes, "
             "characters or bpe; null: words_and_punctuation for text, bytes for language")
    context_length: int = option(256, minimum=8, help="language: tokens per training block (a block holds one more)")
    max_length: Optional[int] = option(None, minimum=1, help="text: tokens per example; null: 95th percentile")
    char_ngrams: int = option(
        DEFAULT_CHAR_NGRAMS, minimum=0, maximum=8,
        help="text: the models also see a bag of the text's character 1..N-grams (fastText's subword features); "
             "0: tokens only")
    char_ngram_buckets: int = option(DEFAULT_CHAR_NGRAM_BUCKETS, minimum=2,
                                     help="text: the ids character n-grams are hashed into")
    max_characters: Optional[int] = option(
        None, minimum=1, help="text: characters per example the n-grams are taken from; null: 95th percentile")
    tfds_data_dir: Optional[str] = option(None, help="tfds: where the prepared data lives")
    max_bad_fraction: float = option(0.01, minimum=0.0, maximum=1.0, help="fail when more inputs are unreadable")
    augment: OfflineAugmentConfig = field(default_factory=OfflineAugmentConfig)

    def __post_init__(self):
        split = self.split
        if len(split) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1
                                  for s in split) or abs(sum(split) - 1) > 1e-6:
            raise ConfigError(f"data.split: {list(split)!r} must be three fractions (train, validation, test) summing to 1")
        if split[0] == 0:
            raise ConfigError("data.split: the train fraction must be above 0")
        if self.image_size is not None and (len(self.image_size) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.image_size)):
            raise ConfigError(f"data.image_size: {list(self.image_size)!r} must be [height, width] in pixels")
        if self.image_size is not None and max(self.image_size) > MAX_IMAGE_SIDE:  # [100000, 100000]: killed, no word
            raise ConfigError(f"data.image_size: {list(self.image_size)!r} is above {MAX_IMAGE_SIDE} pixels a side "
                              f"(one 3-channel {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} image is 48 MiB); crop or tile larger images")
        self._resolve_tokenizer()

    @property
    def is_language(self) -> bool:
        """Whether the source is a text corpus for language modelling (modality `language`)."""
        return is_language_source(self.source)

    def _resolve_tokenizer(self) -> None:
        """null -> the source's default (recorded in config.yaml as applied); a tokenizer of the
        other kind of text data is refused with the allowed values."""
        allowed = LANGUAGE_TOKENIZERS if self.is_language else TEXT_TOKENIZERS
        if self.tokenizer is None:
            object.__setattr__(self, "tokenizer", allowed[0] if self.is_language else DEFAULT_TEXT_TOKENIZER)
        elif self.tokenizer not in allowed:
            kind = "language data" if self.is_language else "text classification"
            raise ConfigError(f"data.tokenizer: {self.tokenizer!r} is not for {kind} (data.source {self.source!r}); "
                              f"allowed: {', '.join(allowed)}")
        if self.tokenizer == "bpe" and self.vocab_size <= BYTE_VOCAB_SIZE:
            raise ConfigError(f"data.vocab_size: {self.vocab_size} leaves bpe no merges (the 3 reserved ids and 256 "
                              f"bytes take {BYTE_VOCAB_SIZE}); set it above {BYTE_VOCAB_SIZE}, e.g. 4096")
        if self.is_language and self.tokenizer == "characters" and self.vocab_size <= LANGUAGE_RESERVED_IDS:
            raise ConfigError(f"data.vocab_size: {self.vocab_size} leaves the characters tokenizer no character (the "
                              f"{LANGUAGE_RESERVED_IDS} reserved ids take them all); set it above, e.g. 512")
        if self.is_language and self.augment.copies:
            raise ConfigError(f"data.augment.copies: {self.augment.copies} augmented copies are not made of language "
                              "data; set it to 0")


def is_language_source(uri: str) -> bool:
    """Whether a data.source URI names a text corpus (text:PATH, python-stdlib)."""
    return uri.partition(":")[0] in LANGUAGE_SOURCE_KINDS


# Random shifts of images larger than SHIFTED_IMAGE_SIDE by up to this fraction of their side, the default of
# model.augment.translation. Measured on 32x32 colour glyphs at random places (docs/performance.md round 8),
# test accuracy without -> with: cnn 0.916 -> 0.966, rnn (conv stem) 0.879 -> 0.960, transformer 0.786 -> 0.898.
# The 8x8 digits (centred, a shift of 1 pixel is 12.5%) were level after 30 epochs but learned slower: a 3-epoch
# cnn 0.84 instead of 0.93, so small images are not shifted.
DEFAULT_IMAGE_TRANSLATION = 0.125
SHIFTED_IMAGE_SIDE = 16


@dataclass(frozen=True)
class AugmentLayersConfig:
    """Online augmentation layers at the model's input: images only, active only in training."""

    flip: str = option("none", choices=("none", "horizontal", "vertical", "horizontal_and_vertical"))
    translation: Optional[float] = option(
        None, minimum=0.0, maximum=1.0,
        help="fraction of height/width; null: 0.125 for images larger than 16x16 (a 4-pixel shift of a 32x32 "
             "image, the CIFAR ResNets' pad-and-crop), 0 for smaller ones")
    rotation: float = option(0.0, minimum=0.0, maximum=1.0, help="fraction of a full turn")
    zoom: float = option(0.0, minimum=0.0, maximum=1.0)
    contrast: float = option(0.0, minimum=0.0, maximum=1.0)

    def applied_translation(self, modality: str, shape: tuple) -> float:
        """`translation` with null resolved for data of `modality` and one example's `shape`:
        DEFAULT_IMAGE_TRANSLATION for images larger than SHIFTED_IMAGE_SIDE on both sides, else 0."""
        if self.translation is not None:
            return self.translation
        large = modality == "image" and min(shape[:2]) > SHIFTED_IMAGE_SIDE
        return DEFAULT_IMAGE_TRANSLATION if large else 0.0

    def enabled(self, modality: str, shape: tuple) -> bool:
        """Whether the model gets augmentation layers: when a key is set, or by default for images larger
        than SHIFTED_IMAGE_SIDE (other data with a key set explicitly is refused by `model_input`)."""
        translation = self.applied_translation(modality, shape)
        return self.flip != "none" or any((translation, self.rotation, self.zoom, self.contrast))


@dataclass(frozen=True)
class ModelConfig:
    """The keys every family shares, plus `family`: the chosen family's own config.

    Family keys read as attributes of the section (`config.model.depth`), as they are written.
    """

    name: str = option("cnn", help="the model family: cnn, resnet, rnn, transformer (classifiers) or gpt (language)")
    dropout: Optional[float] = option(
        None, minimum=0.0, maximum=0.95,
        help="before the classifier (transformer, gpt: in the blocks too); null: 0.1 (resnet on sequences: 0.3)")
    word_dropout: float = option(
        0.1, minimum=0.0, maximum=0.9,
        help="text classifiers: fraction of the real tokens replaced by the out-of-vocabulary id in training")
    char_ngram_dim: int = option(
        32, minimum=1, help="text classifiers: embedding size of the character n-gram bag (data.char_ngrams)")
    initializer: Optional[str] = option(
        None, choices=(None, *INITIALIZERS),
        help="kernel initializer; null: the family's (he_normal for cnn/resnet, glorot_uniform for rnn/transformer)")
    sync_batch_norm: Optional[bool] = option(
        None, help="batch statistics across replicas; null: on when training on 2+ replicas (TF backend)")
    batch_norm_momentum: Optional[float] = option(
        None, minimum=0.0, maximum=1.0,
        help="moving-statistics momentum; null: 0.99, or lower when the run has too few steps to forget the start")
    augment: AugmentLayersConfig = field(default_factory=AugmentLayersConfig)
    family: Any = field(default=None, metadata={"internal": True})  # not a YAML key: built by from_values

    def __post_init__(self):
        if self.family is None:
            object.__setattr__(self, "family", family_config_class(self.name)())

    @property
    def dropout_rate(self) -> float:
        """`model.dropout`, null as DEFAULT_DROPOUT (a family whose default depends on the data, the
        resnet's, resolves null itself)."""
        return DEFAULT_DROPOUT if self.dropout is None else self.dropout

    def __getattr__(self, key: str):
        # only called when `key` is not a shared key: look in the family's own config
        family = self.__dict__.get("family")
        if family is not None and key in {f.name for f in dataclasses.fields(family)}:
            return getattr(family, key)
        raise AttributeError(f"model.{key}: not a key of the {self.__dict__.get('name')!r} family")

    @classmethod
    def shared_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    def to_plain(self) -> dict:
        """Flat, as written: the shared keys, then the family's own."""
        return {**{name: to_plain(getattr(self, name)) for name in self.shared_keys()}, **to_plain(self.family)}

    @classmethod
    def from_values(cls, values: dict, prefix: str) -> "ModelConfig":
        """The flat section: shared keys here, the rest validated by the chosen family's dataclass."""
        if not isinstance(values, dict):
            raise ConfigError(f"{prefix}: expected a mapping of keys, got {values!r}")
        shared = cls.shared_keys()
        name = coerce(f"{prefix}.name", values.get("name", "cnn"), str)
        family_class = family_config_class(name)
        family_keys = [f.name for f in dataclasses.fields(family_class)]
        unknown = sorted(set(values) - set(shared) - set(family_keys))
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}: not a key of the {name} family; allowed: "
                              f"{', '.join(shared + family_keys)}")
        family = build(family_class, {k: v for k, v in values.items() if k in family_keys}, prefix)
        return build(cls, {k: v for k, v in values.items() if k in shared}, prefix, family=family)


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
    deterministic: bool = option(False, help="deterministic input order and ops: the same train.seed, the same weights (slower)")
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
    chief_timeout: int = option(30, minimum=1, help="a worker stops once the chief has been unreachable this "
                                                    "many seconds (longer if a preempted chief restarts)")
    worker_timeout: int = option(300, minimum=10, help="the chief gives a trial to another worker once its worker "
                                                       "has sent nothing this many seconds (workers report every 2 s)")

    def __post_init__(self):
        if not self.objective.strip():
            raise ConfigError("tune.objective: empty; name a metric the training logs, such as val_accuracy or val_loss")
        name = self.objective.lower()  # a loss chosen as the best where it is highest picks the worst trial
        better = ("min" if any(word in name for word in ("loss", "error", "perplexity", "bits_per_byte")) else
                  "max" if any(word in name for word in ("accuracy", "auc", "precision", "recall")) else None)
        if better and self.direction != better:
            raise ConfigError(f"tune.direction: {self.direction} for tune.objective {self.objective!r}, which is "
                              f"better {'lower' if better == 'min' else 'higher'}; set tune.direction={better}")


@dataclass(frozen=True)
class ExportConfig:
    name: str = option("model", help="model name in RUN/export/NAME/VERSION and in the serving URL")
    min_accuracy: Optional[float] = option(None, minimum=0.0, maximum=1.0)
    max_regression: Optional[float] = option(
        0.01, minimum=0.0, maximum=1.0, help="validate: test accuracy a version may lose against the newest blessed "
                                             "one on the same split (noise); null: no comparison")
    warmup_requests: int = option(100, minimum=0, maximum=1000,
                                  help="test inputs in assets.extra/tf_serving_warmup_requests; 0: no warmup file")

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
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
