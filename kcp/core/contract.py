"""The data contract between the stages: `RUN/data/metadata.json` and the Example encoding.

This module and kcp/core/examples.py (the `tf.train.Example` encoding, with TensorFlow)
are the single owner of feature names, dtypes, shapes and how each feature is encoded.
This one never imports TensorFlow, so reading a run's contract is instant. The pipeline
writes through them; the trainer, the tuner and the exporter read through them. Both are
part of the foundation: they import no stage.

One example holds three features:
    key    bytes   a stable identifier of the source example (file path, row id)
    label  int64   index into `class_names`
    INPUT  the model input, named by `input_feature`:
           image:    raw uint8 bytes of shape [height, width, channels]
           sequence: float32 list of shape [time, features]
           text:     the raw UTF-8 string; tokenised in the graph (trainer and export) with
                     RUN/data/vocab.txt and the tokenizer of `tokenize_text` recorded in
                     statistics["tokenizer"]
"""

from __future__ import annotations

import dataclasses
import json
import re
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
ASCII_WHITESPACE = r"[ \t\n\r\x0b\x0c]+"  # what tf.strings.split splits on
# `data.tokenizer`, recorded in the contract's statistics["tokenizer"] (absent: "words"):
#   words                  punctuation stripped, split on whitespace (Keras' default)
#   words_and_punctuation  each punctuation mark a token of its own, then split on whitespace
#   characters             every character a token; a run of whitespace is one " " token
TOKENIZERS = ("words", "words_and_punctuation", "characters")
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
    storage.write_text_atomic(layout.labels, lines_text(contract.class_names))
    if vocabulary is not None:
        storage.write_text_atomic(layout.vocabulary, lines_text(vocabulary))
    storage.write_text_atomic(layout.metadata, contract.to_json())
    return layout.metadata


def read_contract(run_dir: str) -> DataContract:
    path = RunLayout(run_dir).metadata
    if not storage.exists(path):
        raise ContractError(f"{path}: not found; run `kcp preprocess --run-dir {run_dir}` first")
    return DataContract.from_json(storage.read_text(path), where=path)


# --- text -----------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def tokenize_text(text: str, tokenizer: str = "words") -> list[str]:
    """What the in-graph tokenizer (kcp/core/examples.py) does, in Python: lower-case ASCII
    letters only (as `tf.strings.lower` does), then `tokenizer` (one of TOKENIZERS)."""
    lowered = text.translate(_ASCII_LOWER)
    if tokenizer == "words":
        return [token for token in re.split(ASCII_WHITESPACE, re.sub(STRIP_PUNCTUATION, "", lowered)) if token]
    if tokenizer == "words_and_punctuation":
        spaced = re.sub(f"({STRIP_PUNCTUATION})", r" \1 ", lowered)
        return [token for token in re.split(ASCII_WHITESPACE, spaced) if token]
    if tokenizer == "characters":
        return list(re.sub(ASCII_WHITESPACE, " ", lowered).strip(" "))
    raise ValueError(f"data.tokenizer: {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")


def standardize_text(text: str) -> list[str]:
    """The `words` tokenizer: lower-case ASCII, strip punctuation, split on ASCII whitespace."""
    return tokenize_text(text, "words")


def text_tokenizer(contract: DataContract) -> str:
    """The tokenizer the contract's vocabulary was made with (contracts before it was recorded: words)."""
    return contract.statistics.get("tokenizer", "words")


def lines_text(items) -> str:
    """One item a line, for labels.txt and vocab.txt. Only "\n" ends a line, so an item may hold
    any other character (U+0085, U+2028, \x1c..\x1e, \r: `str.splitlines` splits on all of them)."""
    items = [str(item) for item in items]
    broken = next((item for item in items if "\n" in item), None)
    if broken is not None:
        raise ContractError(f"{broken!r} contains a line break; class names and tokens are written one a line")
    return "".join(f"{item}\n" for item in items)


def read_lines(text: str) -> list[str]:
    """The items of `lines_text`: split on "\n" only."""
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n") if text else []


def read_vocabulary(run_dir: str) -> list[str]:
    path = RunLayout(run_dir).vocabulary
    if not storage.exists(path):
        raise ContractError(f"{path}: not found; text runs need the vocabulary `kcp preprocess` writes")
    return read_lines(storage.read_text(path))
