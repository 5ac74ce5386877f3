"""The data contract between the stages: `RUN/data/metadata.json` and the Example encoding.

This module is the single owner of feature names, dtypes, shapes and how each feature is
encoded in a `tf.train.Example`. The pipeline writes through it; the trainer, the tuner
and the exporter read through it. It is part of the foundation: it imports no stage.

One example holds three features:
    key    bytes   a stable identifier of the source example (file path, row id)
    label  int64   index into `class_names`
    INPUT  the model input, named by `input_feature`:
           image:    raw uint8 bytes of shape [height, width, channels]
           sequence: float32 list of shape [time, features]
           text:     the raw UTF-8 string; tokenised in the graph (trainer and export) with
                     RUN/data/vocab.txt and the standardisation in `standardize_text`
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from kcp.core import storage
from kcp.core.errors import UserError
from kcp.core.layout import RunLayout

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MODALITIES = ("image", "sequence", "text")
# Text ids: 0 is padding, 1 out-of-vocabulary, then vocab.txt's tokens in order (Keras'
# TextVectorization convention). The strip pattern is TextVectorization's default.
STRIP_PUNCTUATION = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'
RESERVED_TOKEN_IDS = 2
KEY_FEATURE = "key"
LABEL_FEATURE = "label"


class ContractError(UserError, ValueError):
    """metadata.json is missing, unreadable, or not one this version understands."""


@dataclass(frozen=True)
class FeatureSpec:
    dtype: str  # numpy dtype name of the decoded values: uint8, float32; "string" for text
    shape: tuple  # decoded shape of one example; () for text
    encoding: str  # raw_bytes | float_list | utf8


@dataclass(frozen=True)
class SplitInfo:
    count: int
    num_shards: int
    file_pattern: str  # glob relative to the data directory


@dataclass(frozen=True)
class DataContract:
    modality: str
    input_feature: str
    input_spec: FeatureSpec
    class_names: tuple
    splits: dict  # split name -> SplitInfo
    statistics: dict  # mean/std per channel (images) or per feature (sequences), class_counts
    compression: str = "none"
    source: str = ""
    bad_examples: int = 0
    augmentation: dict = dataclasses.field(default_factory=lambda: {"copies": 0})
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.input_spec.shape)

    def to_json(self) -> str:
        plain = dataclasses.asdict(self)
        plain["input_spec"]["shape"] = list(self.input_spec.shape)
        plain["class_names"] = list(self.class_names)
        return json.dumps(plain, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = METADATA_FILE) -> "DataContract":
        try:
            plain = json.loads(text)
        except json.JSONDecodeError as error:
            raise ContractError(f"{where}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(plain, dict):
            raise ContractError(f"{where}: expected a JSON object")
        version = plain.get("format_version")
        if version != FORMAT_VERSION:
            raise ContractError(
                f"{where}: format_version {version!r} is not supported (this kcp reads {FORMAT_VERSION}); "
                "rerun `kcp preprocess` with this version"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(plain))
        if missing:
            raise ContractError(f"{where}: missing key {missing[0]!r}")
        unknown = sorted(set(plain) - names)
        if unknown:
            raise ContractError(f"{where}: unknown key {unknown[0]!r}")
        try:
            plain["input_spec"] = FeatureSpec(**{**plain["input_spec"], "shape": tuple(plain["input_spec"]["shape"])})
            plain["splits"] = {name: SplitInfo(**info) for name, info in plain["splits"].items()}
        except (TypeError, KeyError, AttributeError) as error:
            raise ContractError(f"{where}: malformed input_spec or splits ({error})") from None
        plain["class_names"] = tuple(plain["class_names"])
        contract = cls(**plain)
        if contract.modality not in MODALITIES:
            raise ContractError(f"{where}: modality {contract.modality!r} is not one of {', '.join(MODALITIES)}")
        return contract

    def split_files(self, data_dir: str, split: str) -> list[str]:
        if split not in self.splits:
            raise ContractError(f"split {split!r} is not in the contract; it has {', '.join(self.splits)}")
        return storage.glob(storage.join(data_dir, self.splits[split].file_pattern))


def data_dir(run_dir: str) -> str:
    return RunLayout(run_dir).data


def write_contract(run_dir: str, contract: DataContract, vocabulary: list[str] | None = None) -> str:
    """Writes labels.txt (and vocab.txt), then metadata.json last and atomically; returns its path."""
    layout = RunLayout(run_dir)
    storage.write_text_atomic(layout.labels, "".join(f"{n}\n" for n in contract.class_names))
    if vocabulary is not None:
        storage.write_text_atomic(layout.vocabulary, "".join(f"{t}\n" for t in vocabulary))
    storage.write_text_atomic(layout.metadata, contract.to_json())
    return layout.metadata


def read_contract(run_dir: str) -> DataContract:
    path = RunLayout(run_dir).metadata
    if not storage.exists(path):
        raise ContractError(f"{path}: not found; run `kcp preprocess --run-dir {run_dir}` first")
    return DataContract.from_json(storage.read_text(path), where=path)


# --- tf.train.Example encoding ------------------------------------------------------------

def encode_example(contract_input: FeatureSpec, input_feature: str, key: str, inputs, label: int) -> bytes:
    """Serializes one example. `inputs` is a NumPy array of the spec's dtype and shape, or a str."""
    import numpy as np
    import tensorflow as tf

    if contract_input.encoding == "utf8":
        if not isinstance(inputs, str):
            raise ValueError(f"{key}: text input is {type(inputs).__name__}, not a string")
        value = tf.train.Feature(bytes_list=tf.train.BytesList(value=[inputs.encode("utf-8")]))
        return _serialize(key, label, input_feature, value)
    array = np.asarray(inputs)
    if tuple(array.shape) != tuple(contract_input.shape):
        raise ValueError(f"{key}: shape {tuple(array.shape)} does not match the contract's {tuple(contract_input.shape)}")
    if contract_input.encoding == "raw_bytes":
        value = tf.train.Feature(bytes_list=tf.train.BytesList(value=[array.astype(contract_input.dtype).tobytes()]))
    elif contract_input.encoding == "float_list":
        value = tf.train.Feature(float_list=tf.train.FloatList(value=array.astype(np.float32).ravel()))
    else:
        raise ValueError(f"unknown encoding {contract_input.encoding!r}")
    return _serialize(key, label, input_feature, value)


def _serialize(key: str, label: int, input_feature: str, value) -> bytes:
    import tensorflow as tf

    features = {
        KEY_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")])),
        LABEL_FEATURE: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        input_feature: value,
    }
    # deterministic: the feature map's order would otherwise differ between processes.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def parsing_spec(contract: DataContract) -> dict:
    """The `tf.io.parse_example` spec of the contract's examples."""
    import math

    import tensorflow as tf

    spec = {
        KEY_FEATURE: tf.io.FixedLenFeature([], tf.string),
        LABEL_FEATURE: tf.io.FixedLenFeature([], tf.int64),
    }
    encoding = contract.input_spec.encoding
    if encoding in ("raw_bytes", "utf8"):
        spec[contract.input_feature] = tf.io.FixedLenFeature([], tf.string)
    elif encoding == "float_list":
        spec[contract.input_feature] = tf.io.FixedLenFeature([math.prod(contract.input_shape)], tf.float32)
    return spec


def parse_examples(contract: DataContract, serialized):
    """Parses a batch of serialized Examples -> (inputs in the spec's dtype and shape, labels, keys)."""
    import tensorflow as tf

    parsed = tf.io.parse_example(serialized, parsing_spec(contract))
    raw = parsed[contract.input_feature]
    shape = [-1, *contract.input_shape]
    if contract.input_spec.encoding == "utf8":
        inputs = raw
    elif contract.input_spec.encoding == "raw_bytes":
        inputs = tf.reshape(tf.io.decode_raw(raw, tf.dtypes.as_dtype(contract.input_spec.dtype)), shape)
    else:
        inputs = tf.reshape(raw, shape)
    return inputs, parsed[LABEL_FEATURE], parsed[KEY_FEATURE]


def read_split(contract: DataContract, data_dir: str, split, batch_size: int, *, shuffle_buffer: int = 0,
               seed=None, deterministic: bool = True, cache: bool = False, drop_remainder: bool = False):
    """A `tf.data.Dataset` of batches `(inputs, labels, keys)` from one split's shards.

    Inputs keep the contract's dtype (uint8 images stay uint8). Files are read in parallel
    (interleave) and batches parsed in parallel; with `shuffle_buffer` the file order and
    the records are shuffled with `seed`. `cache` keeps the serialized records in memory
    after the first pass, so later epochs skip the file reads.
    """
    import tensorflow as tf

    names = [split] if isinstance(split, str) else list(split)  # several splits read as one
    files = [path for name in names for path in contract.split_files(data_dir, name)]
    if not files:
        raise ContractError(f"{data_dir}: no TFRecord files match split {split!r}")
    compression = "GZIP" if contract.compression == "gzip" else ""
    autotune = tf.data.AUTOTUNE
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_buffer:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=compression),
        cycle_length=min(len(files), 16), num_parallel_calls=autotune, deterministic=deterministic)
    if cache:
        dataset = dataset.cache()
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    # The contract knows the count: a known cardinality gives Keras its steps per epoch.
    count = sum(contract.splits[name].count for name in names)
    batches = count // batch_size if drop_remainder else -(-count // batch_size)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.map(lambda serialized: parse_examples(contract, serialized),
                       num_parallel_calls=autotune, deterministic=deterministic)


# --- text -----------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def standardize_text(text: str) -> list[str]:
    """What the in-graph tokenizer does, in Python: lower-case ASCII letters only (as
    `tf.strings.lower` does), strip punctuation, split on ASCII whitespace."""
    import re

    stripped = re.sub(STRIP_PUNCTUATION, "", text.translate(_ASCII_LOWER))
    return [token for token in re.split(r"[ \t\n\r\x0b\x0c]+", stripped) if token]


def read_vocabulary(run_dir: str) -> list[str]:
    path = RunLayout(run_dir).vocabulary
    if not storage.exists(path):
        raise ContractError(f"{path}: not found; text runs need the vocabulary `kcp preprocess` writes")
    return storage.read_text(path).splitlines()


def text_vectorizer(contract: DataContract, run_dir: str):
    """A Keras TextVectorization layer: raw strings -> int ids of length `max_length`."""
    import keras

    return keras.layers.TextVectorization(
        standardize="lower_and_strip_punctuation", split="whitespace", output_mode="int",
        output_sequence_length=int(contract.statistics["max_length"]), vocabulary=read_vocabulary(run_dir),
        name="tokenize")
