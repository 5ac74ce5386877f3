"""The contract's `tf.train.Example` parsing into tensors: parsing examples and reading a split
as a `tf.data.Dataset` (trainer, exporter, validation, report), the in-graph features of text
runs (token ids and hashed character n-grams), and the in-graph encoder and decoder of language
runs. Imports TensorFlow; writing the examples is kcp/core/example_proto.py and the contract
itself (metadata.json) is kcp/core/contract.py, neither of which does.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from kcp.core import bpe
from kcp.core.char_ngrams import char_ngram_count, char_ngram_settings
from kcp.core.contract import (ASCII_WHITESPACE, KEY_FEATURE, LABEL_FEATURE, LANGUAGE_RESERVED_IDS, LANGUAGE_UNKNOWN,
                               STRIP_PUNCTUATION, ContractError, DataContract, language_pieces,
                               language_tokenizer, language_vocabulary, read_vocabulary, text_tokenizer)


def parsing_spec(contract: DataContract, labelled: bool = True) -> dict:
    """The `tf.io.parse_example` spec of the contract's examples; without `labelled`, the input
    feature alone (what a client classifying new data sends: no key, no label)."""
    spec = {KEY_FEATURE: tf.io.FixedLenFeature([], tf.string)} if labelled else {}
    if contract.modality != "language" and labelled:
        spec[LABEL_FEATURE] = tf.io.FixedLenFeature([], tf.int64)
    encoding = contract.input_spec.encoding
    if encoding in ("raw_bytes", "utf8"):
        spec[contract.input_feature] = tf.io.FixedLenFeature([], tf.string)
    elif encoding == "float_list":
        spec[contract.input_feature] = tf.io.FixedLenFeature([math.prod(contract.input_shape)], tf.float32)
    elif encoding == "int64_list":
        spec[contract.input_feature] = tf.io.FixedLenFeature([math.prod(contract.input_shape)], tf.int64)
    return spec


def parse_examples(contract: DataContract, serialized, labelled: bool = True):
    """Parses a batch of serialized Examples -> (inputs in the spec's dtype and shape, labels, keys).

    Language blocks come as (int32 tokens (batch, context_length + 1), None, keys): no labels;
    `language_pairs` makes the model's inputs and targets of the tokens. Without `labelled` only
    the input feature is read and required (labels and keys are None): the export's serve_examples.
    """
    parsed = tf.io.parse_example(serialized, parsing_spec(contract, labelled))
    raw = parsed[contract.input_feature]
    if contract.modality == "language":
        return tf.cast(raw, tf.int32), None, parsed.get(KEY_FEATURE)
    shape = [-1, *contract.input_shape]
    if contract.input_spec.encoding == "utf8":
        inputs = raw
    elif contract.input_spec.encoding == "raw_bytes":
        inputs = tf.reshape(tf.io.decode_raw(raw, tf.dtypes.as_dtype(contract.input_spec.dtype)), shape)
    else:
        inputs = tf.reshape(raw, shape)
    return inputs, parsed.get(LABEL_FEATURE), parsed.get(KEY_FEATURE)


def record_compression(contract: DataContract) -> str:
    """The contract's shard compression as tf.data.TFRecordDataset names it ("GZIP" or "")."""
    return "GZIP" if contract.compression == "gzip" else ""


def read_split(contract: DataContract, data_dir: str, split, batch_size: int, *, shuffle_buffer: int = 0,
               seed=None, deterministic: bool = True, cache: bool = False, drop_remainder: bool = False,
               files_of: tuple[int, int] | None = None):
    """A `tf.data.Dataset` of batches `(inputs, labels, keys)` from one split's shards
    (language: `(tokens, None, keys)`, see `parse_examples`).

    Inputs keep the contract's dtype (uint8 images stay uint8). Files are read in parallel
    (interleave) and batches parsed in parallel; with `shuffle_buffer` the file order and
    the records are shuffled with `seed`. `cache` keeps the serialized records in memory
    after the first pass, so later epochs skip the file reads.

    `files_of=(index, count)` reads only every `count`-th file from the `index`-th (one
    worker's share) and repeats the records without end: the caller sets the steps.
    """
    names = [split] if isinstance(split, str) else list(split)  # several splits read as one
    files = [path for name in names for path in contract.split_files(data_dir, name)]
    if not files:
        raise ContractError(f"{data_dir}: no TFRecord files match split {split!r}")
    if files_of is not None:
        index, count = files_of
        files = files[index::count]
    compression = record_compression(contract)
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
    if files_of is not None:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if files_of is None:  # the contract knows the count: a known cardinality gives Keras its steps per epoch
        count = sum(contract.splits[name].count for name in names)
        batches = count // batch_size if drop_remainder else -(-count // batch_size)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.map(lambda serialized: parse_examples(contract, serialized),
                       num_parallel_calls=autotune, deterministic=deterministic)


# The in-graph halves of `contract.tokenize_text`, after TextVectorization's "lower". Registered,
# so a TextVectorization that uses them serializes (get_config) and loads by name.
@keras.saving.register_keras_serializable(package="kcp")
def split_words_and_punctuation(texts):
    """(batch,) lower-cased strings -> ragged tokens: words, and each punctuation mark on its own."""
    return tf.strings.split(tf.strings.regex_replace(texts, f"({STRIP_PUNCTUATION})", r" \1 "))


def collapse_whitespace(texts):
    """Each run of ASCII whitespace one space, none at either end (`contract.tokenize_text`'s characters)."""
    return tf.strings.regex_replace(tf.strings.regex_replace(texts, ASCII_WHITESPACE, " "), "^ | $", "")


@keras.saving.register_keras_serializable(package="kcp")
def split_characters(texts):
    """(batch,) lower-cased strings -> ragged characters; a run of whitespace is one " "."""
    return tf.strings.unicode_split(collapse_whitespace(texts), "UTF-8")


TOKENIZER_LAYER_SETTINGS = {  # data.tokenizer -> TextVectorization's standardize and split
    "words": {"standardize": "lower_and_strip_punctuation", "split": "whitespace"},
    "words_and_punctuation": {"standardize": "lower", "split": split_words_and_punctuation},
    "characters": {"standardize": "lower", "split": split_characters},
}


def text_vectorizer(contract: DataContract, run_dir: str):
    """Raw strings -> the text model's int64 input, (batch, max_length) token ids, then (with
    `data.char_ngrams`) the ids of the text's character n-grams (`TextFeatures`).

    The tokens come from a Keras TextVectorization layer with the tokenizer the contract's vocabulary
    was made with (tested token for token against `contract.tokenize_text`)."""
    tokens = keras.layers.TextVectorization(
        **TOKENIZER_LAYER_SETTINGS[text_tokenizer(contract)], output_mode="int",
        output_sequence_length=int(contract.statistics["max_length"]), vocabulary=read_vocabulary(run_dir),
        name="tokenize")
    n, buckets, max_characters = char_ngram_settings(contract)
    return TextFeatures(tokens, n, buckets, max_characters) if n else tokens


def char_ngram_ids(texts, n: int, buckets: int, max_characters: int):
    """(batch,) strings -> (batch, char_ngram_count(n, max_characters)) int64 ids of their character
    1..n-grams, hashed (`char_ngrams.char_ngrams` says which grams, in Python), 0 after a text's last."""
    cut = tf.strings.substr(collapse_whitespace(tf.strings.lower(texts)), 0, max_characters, unit="UTF8_CHAR")
    characters = tf.strings.unicode_split(tf.strings.join([" ", cut, " "]), "UTF-8", errors="replace")
    grams = tf.concat([tf.strings.ngrams(characters, width, separator="") for width in range(1, n + 1)], axis=1)
    ids = tf.strings.to_hash_bucket_fast(grams, buckets - 1) + 1
    return ids.to_tensor(default_value=0, shape=[None, char_ngram_count(n, max_characters)])


class TextFeatures(tf.Module):
    """Raw strings -> int64 (batch, max_length + char_ngram_count): the TextVectorization's token
    ids, then `char_ngram_ids`. One tensor, so the trainer's datasets, the export's signatures and
    the report feed text models as before; the models split it (trainer/models/common.py)."""

    def __init__(self, tokens, n: int, buckets: int, max_characters: int):
        super().__init__(name="text_features")
        self.tokens = tokens  # tracked: its lookup table goes into the SavedModel
        self.n, self.buckets, self.max_characters = n, buckets, max_characters

    def __call__(self, texts):
        texts = tf.convert_to_tensor(texts, tf.string)
        ids = tf.cast(self.tokens(texts), tf.int64)
        return tf.concat([ids, char_ngram_ids(texts, self.n, self.buckets, self.max_characters)], axis=1)


# --- language -------------------------------------------------------------------------

def language_pairs(tokens):
    """Blocks (..., context_length + 1) -> (inputs block[..., :-1], targets block[..., 1:]):
    the model predicts each next token. Targets equal to LANGUAGE_PAD carry no loss."""
    return tokens[..., :-1], tokens[..., 1:]


class LanguageEncoder(tf.Module):
    """Strings (batch,) -> ragged int32 token ids (batch, None), token for token
    `contract.encode_language` (no separator appended).

    A `tf.Module`: the characters lookup table is a tracked resource, so an encoder set as an
    attribute of the exported module (or of a Keras layer/model) is saved with it in the
    SavedModel. `__call__` is a `tf.function` and works inside other `tf.function`s.

    bpe: keras_hub's `BytePairTokenizer` (GPT-2's byte-level BPE in TensorFlow ops: its lookup
    tables and word cache are saved with the module) with the vocabulary of `kcp.core.bpe`, whose
    Python encoder mirrors its split. It runs on its TensorFlow path, as it always does inside a
    `tf.function`: eagerly keras_hub 0.32 would run Hugging Face `tokenizers` with another split.
    `vocabulary` is then the merges (merges.txt's lines).
    """

    def __init__(self, tokenizer: str, vocabulary: list[str] | None = None, name: str = "language_encoder"):
        super().__init__(name=name)
        self.tokenizer = tokenizer
        if tokenizer == "characters":
            vocabulary = list(vocabulary or ())
            initializer = tf.lookup.KeyValueTensorInitializer(
                tf.constant(vocabulary, tf.string),
                tf.range(LANGUAGE_RESERVED_IDS, LANGUAGE_RESERVED_IDS + len(vocabulary), dtype=tf.int64))
            self.table = tf.lookup.StaticHashTable(initializer, default_value=LANGUAGE_UNKNOWN)
        elif tokenizer == "bpe":
            import keras_hub  # only bpe needs it (and its TensorFlow Text ops)

            lines = list(vocabulary or ())
            if not lines:
                raise ValueError("bpe: no merges (keras_hub's BytePairTokenizer needs one at least)")
            self.byte_pair = keras_hub.tokenizers.BytePairTokenizer(
                vocabulary=bpe.vocabulary(bpe.parse_merges(lines), LANGUAGE_RESERVED_IDS), merges=lines, dtype="int32")
        elif tokenizer != "bytes":
            raise ValueError(f"data.tokenizer: {tokenizer!r} is not a language tokenizer (bytes, characters, bpe)")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, texts):
        if self.tokenizer == "bytes":
            pieces = tf.strings.bytes_split(texts)  # (batch, None) one-byte strings
            values = tf.reshape(tf.io.decode_raw(pieces.flat_values, tf.uint8), [-1])
            return pieces.with_flat_values(tf.cast(values, tf.int32) + LANGUAGE_RESERVED_IDS)
        if self.tokenizer == "bpe":  # split at NULs first (see kcp.core.bpe.pretokenize), each NUL its byte's id
            pieces = tf.strings.split(texts, sep="\x00")  # ragged (batch, pieces), at least one piece a text
            ids = tf.cast(self.byte_pair.tokenize(pieces.flat_values), tf.int32)  # ragged (pieces, tokens)
            ids = tf.concat([ids, tf.fill([ids.nrows(), 1], tf.constant(LANGUAGE_RESERVED_IDS, tf.int32))], axis=1)
            return tf.RaggedTensor.from_row_splits(ids, pieces.row_splits).merge_dims(1, 2)[:, :-1]
        characters = tf.strings.unicode_split(texts, "UTF-8", errors="replace")  # (batch, None) code points
        return characters.with_flat_values(tf.cast(self.table.lookup(characters.flat_values), tf.int32))


class LanguageDecoder(tf.Module):
    """Int32 ids (batch, n) -> strings (batch,), equal to `contract.decode_language` per row:
    pads dropped, the separator as LANGUAGE_SEPARATOR_TEXT, unknown and out-of-range ids as
    U+FFFD, invalid UTF-8 byte runs replaced (ICU's replacement, which matches Python's). The
    pieces are a constant of the graph: no resource to track."""

    def __init__(self, tokenizer: str, vocabulary: list[str] | None = None, name: str = "language_decoder"):
        super().__init__(name=name)
        self.tokenizer = tokenizer
        self.pieces = tf.constant(language_pieces(tokenizer, vocabulary), tf.string)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def __call__(self, ids):
        count = tf.shape(self.pieces, out_type=tf.int32)[0]
        ids = tf.where((ids < 0) | (ids >= count), LANGUAGE_UNKNOWN, ids)
        joined = tf.strings.reduce_join(tf.gather(self.pieces, ids), axis=-1)  # (batch,)
        if self.tokenizer in ("bytes", "bpe"):  # a byte (or a bpe token) may end mid-character
            joined = tf.strings.unicode_transcode(joined, "UTF-8", "UTF-8", errors="replace",
                                                  replacement_char=0xFFFD)
        return joined


def language_encoder(contract: DataContract, run_dir: str) -> LanguageEncoder:
    """The run's in-graph encoder (its tokenizer and, for characters, RUN/data/vocab.txt)."""
    return LanguageEncoder(language_tokenizer(contract), language_vocabulary(run_dir, contract))


def language_decoder(contract: DataContract, run_dir: str) -> LanguageDecoder:
    """The run's in-graph decoder, the inverse of `language_encoder` (up to unknown characters)."""
    return LanguageDecoder(language_tokenizer(contract), language_vocabulary(run_dir, contract))
