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
A `language` example (language modelling) has no label and no classes: `key` ("train/00000/000123":
split, shard, block) and `tokens`, an int64 list of context_length + 1 token ids, one block of
the split's token stream (the trainer predicts block[1:] from block[:-1]). Ids: LANGUAGE_PAD,
LANGUAGE_UNKNOWN, LANGUAGE_SEPARATOR (after every document), then the tokens of
`encode_language` from LANGUAGE_RESERVED_IDS on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass

from kcp.core import bpe, storage
from kcp.core.errors import UserError
from kcp.core.layout import RunLayout

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MODALITIES = ("image", "sequence", "text", "language")
# Text ids: 0 is padding, 1 out-of-vocabulary, then vocab.txt's tokens in order (Keras'
# TextVectorization convention). The strip pattern is TextVectorization's default.
STRIP_PUNCTUATION = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'
ASCII_WHITESPACE = r"[ \t\n\r\x0b\x0c]+"  # what tf.strings.split splits on
# `data.tokenizer`, recorded in the contract's statistics["tokenizer"] (absent: "words"):
#   words                  punctuation stripped, split on whitespace (Keras' default)
#   words_and_punctuation  each punctuation mark a token of its own, then split on whitespace
#   characters             every character a token; a run of whitespace is one " " token
# and for language data (statistics["tokenizer"] of a `language` contract, see `encode_language`):
#   bytes                  every UTF-8 byte a token (id = byte + 3, 259 ids): nothing is out of vocabulary
#   characters             every character a token, as written (no lower-casing, whitespace kept);
#                          the vocabulary is learned from the train split, unknown characters -> 1
#   bpe                    byte-level BPE (GPT-2's): merges learned from the train split, ids 3-258 the
#                          bytes, then one per merge; nothing is out of vocabulary (kcp/core/bpe.py)
TEXT_TOKENIZERS = ("words", "words_and_punctuation", "characters")
# The text default (config.yaml records it as applied; contracts without statistics["tokenizer"] stay
# "words"): punctuation marks are tokens, so code, identifiers and lines of punctuation keep what tells
# them apart, and prose loses nothing (docs/data.md#text-tokenizers; measured in docs/performance.md).
DEFAULT_TEXT_TOKENIZER = "words_and_punctuation"
LANGUAGE_TOKENIZERS = ("bytes", "characters", "bpe")
TOKENIZERS = ("words", "words_and_punctuation", "characters", "bytes", "bpe")
RESERVED_TOKEN_IDS = 2
# Language token ids: a fixed interface the trainer and the export code against.
LANGUAGE_PAD = 0  # fills the last block of a shard; never a target
LANGUAGE_UNKNOWN = 1  # a character outside the vocabulary (characters tokenizer)
LANGUAGE_SEPARATOR = 2  # after every document: the model learns where documents end
# kcp generate's and kcp.generate's settings when not given (the exported `generate` signature
# takes every one; its warmup records use these); max_new_tokens at most half the context
GENERATE_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0}
LANGUAGE_RESERVED_IDS = 3  # real tokens from here
LANGUAGE_SEPARATOR_TEXT = "\n\n"  # what the separator decodes to
LANGUAGE_UNKNOWN_TEXT = "\ufffd"  # what an unknown (or out-of-range) id decodes to
BYTE_VOCAB_SIZE = 256 + LANGUAGE_RESERVED_IDS
KEY_FEATURE = "key"
LABEL_FEATURE = "label"


class ContractError(UserError, ValueError):
    """metadata.json is missing, unreadable, or not one this version understands."""


@dataclass(frozen=True)
class FeatureSpec:
    dtype: str  # numpy dtype name of the decoded values: uint8, float32, int64; "string" for text
    shape: tuple  # decoded shape of one example; () for text, (context_length + 1,) for language
    encoding: str  # raw_bytes | float_list | utf8 | int64_list


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
    class_names: tuple  # () for language
    splits: dict  # split name -> SplitInfo; a language split's count is its number of blocks
    statistics: dict  # mean/std per channel (images) or per feature (sequences), class_counts; language:
    # tokenizer, vocab_size, context_length, and per split documents, bytes, tokens, target_bytes
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
    raise ValueError(f"data.tokenizer: {tokenizer!r} is not one of {', '.join(TEXT_TOKENIZERS)}")


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


# --- language -------------------------------------------------------------------------

def language_tokenizer(contract: DataContract) -> str:
    """The tokenizer of a language contract's token ids: bytes, characters or bpe."""
    return contract.statistics["tokenizer"]


@functools.lru_cache(maxsize=4)
def _character_ids(vocabulary: tuple) -> dict:
    return {token: index + LANGUAGE_RESERVED_IDS for index, token in enumerate(vocabulary)}


def encode_language(text: str, tokenizer: str, vocabulary: list[str] | None = None) -> list[int]:
    """A document's token ids, without the separator the pipeline appends after it.

    bytes: each UTF-8 byte b is id b + 3 (`vocabulary` unused). characters: each character
    (code point, as written) is 3 + its index in `vocabulary`, or LANGUAGE_UNKNOWN. bpe:
    `vocabulary` is the merges ("LEFT RIGHT", merges.txt's lines), see kcp/core/bpe.py. The
    in-graph encoder (`kcp.core.examples.language_encoder`) gives the same ids, tested.
    """
    if tokenizer == "bytes":
        return [byte + LANGUAGE_RESERVED_IDS for byte in text.encode("utf-8")]
    if tokenizer == "characters":
        ids = _character_ids(tuple(vocabulary or ()))
        return [ids.get(character, LANGUAGE_UNKNOWN) for character in text]
    if tokenizer == "bpe":
        return bpe.encoder(tuple(vocabulary or ()), LANGUAGE_RESERVED_IDS).encode(text)
    raise ValueError(f"data.tokenizer: {tokenizer!r} is not one of {', '.join(LANGUAGE_TOKENIZERS)} (language)")


def language_pieces(tokenizer: str, vocabulary: list[str] | None = None) -> list[bytes]:
    """What each id decodes to, as UTF-8 bytes, indexed by id: pad "", unknown U+FFFD, the
    separator LANGUAGE_SEPARATOR_TEXT, then one byte (bytes), one character (characters), or the
    256 bytes and each merge's token (bpe)."""
    reserved = [b"", LANGUAGE_UNKNOWN_TEXT.encode("utf-8"), LANGUAGE_SEPARATOR_TEXT.encode("utf-8")]
    if tokenizer == "bytes":
        return reserved + [bytes([byte]) for byte in range(256)]
    if tokenizer == "characters":
        return reserved + [token.encode("utf-8") for token in vocabulary or ()]
    if tokenizer == "bpe":
        return reserved + list(bpe.token_pieces(tuple(vocabulary or ())))
    raise ValueError(f"data.tokenizer: {tokenizer!r} is not one of {', '.join(LANGUAGE_TOKENIZERS)} (language)")


def decode_language(ids, tokenizer: str, vocabulary: list[str] | None = None) -> str:
    """Token ids -> text: pads dropped, the separator as LANGUAGE_SEPARATOR_TEXT, unknown and
    out-of-range ids as U+FFFD; byte runs that are not valid UTF-8 (a model may emit any byte)
    decoded with errors="replace". The in-graph decoder gives the same string, tested."""
    pieces = language_pieces(tokenizer, vocabulary)
    unknown = pieces[LANGUAGE_UNKNOWN]
    joined = b"".join(pieces[i] if 0 <= i < len(pieces) else unknown for i in (int(i) for i in ids))
    return joined.decode("utf-8", errors="replace")


def language_vocab_size(tokenizer: str, vocabulary: list[str] | None = None) -> int:
    """Ids the model's embedding needs: the reserved ids and the tokens."""
    if tokenizer == "bpe":
        return BYTE_VOCAB_SIZE + len(bpe.parse_merges(vocabulary or ()))
    return BYTE_VOCAB_SIZE if tokenizer == "bytes" else LANGUAGE_RESERVED_IDS + len(vocabulary or ())


def escape_token(token: str) -> str:
    """A character token as one line of vocab.txt: a backslash written twice, a line feed as
    backslash + "n" (vocab.txt holds one token a line, and "\\n" is a character of code)."""
    return token.replace("\\", "\\\\").replace("\n", "\\n")


def unescape_token(line: str) -> str:
    """The inverse of `escape_token`."""
    return re.sub(r"\\(.)", lambda match: "\n" if match.group(1) == "n" else match.group(1), line, flags=re.DOTALL)


def language_vocabulary(run_dir: str, contract: DataContract | None = None) -> list[str] | None:
    """The characters of a language run's vocab.txt (unescaped), in id order; the merges of its
    merges.txt ("LEFT RIGHT", the header dropped) for bpe; None for bytes. `contract` is the
    run's when not given."""
    tokenizer = language_tokenizer(contract or read_contract(run_dir))
    if tokenizer == "bytes":
        return None
    if tokenizer == "bpe":
        path = RunLayout(run_dir).merges
        if not storage.exists(path):
            raise ContractError(f"{path}: not found; bpe runs need the merges `kcp preprocess` writes")
        return bpe.merge_lines(bpe.parse_merges(read_lines(storage.read_text(path))))
    return [unescape_token(line) for line in read_vocabulary(run_dir)]


def bits_per_byte(nats_per_token: float, contract: DataContract, split: str) -> float:
    """Bits per UTF-8 byte of a split from the mean loss per target token (nats; pad targets
    excluded): the loss summed over the split's targets, divided by the bytes those targets
    encode, in bits. Comparable across tokenizers. Uses statistics["target_bytes"] (the first
    token of each block is never a target, so the documents' "bytes" would count ~1/(T+1)
    too many); contracts without it fall back to "bytes"."""
    statistics = contract.statistics
    tokens = statistics["tokens"][split]
    encoded = statistics.get("target_bytes", statistics["bytes"])[split]
    if not encoded:
        raise ContractError(f"split {split!r} holds no bytes: bits per byte is undefined")
    return nats_per_token * tokens / encoded / math.log(2)


def check_trained_on_contract(layout: RunLayout, run_dir: str, before: str = "exporting") -> dict:
    """Refuses to pair the data contract of RUN/data with a model trained on another one (a
    preprocess rerun after training): the normalisation, vocabulary and class names inside the
    export would not be the model's. Returns {contract_sha256} for the export's fingerprint."""
    contract_sha = storage.sha256(layout.metadata)
    if storage.exists(layout.metrics):
        trained_on = json.loads(storage.read_text(layout.metrics)).get("contract_sha256")
        if trained_on and trained_on != contract_sha:
            raise UserError(f"{layout.model} was trained on another data contract than {layout.metadata} "
                            f"(preprocessed again since); run `kcp train --run-dir {run_dir}` before {before}")
    return {"contract_sha256": contract_sha}
