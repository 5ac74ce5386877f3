"""The full pass over the train split (per-channel mean/std, vocabulary, token lengths, class
counts) and the summary file the driver reads back after the pipeline."""

from __future__ import annotations

import json
import math

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from kcp.core import contract as contract_lib
from kcp.core.char_ngrams import char_ngram_text

PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
SUMMED = ("dead_letters", "read", "augmented")  # summary counts that several steps add to


class ChannelStatsFn(beam.CombineFn):
    """Mean and standard deviation per channel (the last axis) over every value of every input.

    Sums are kept in float64, so a million 32x32x3 images lose no precision that matters.
    """

    def create_accumulator(self):
        return (0, None, None)  # (values per channel, sum, sum of squares)

    def add_input(self, accumulator, inputs):
        count, total, squares = accumulator
        values = np.asarray(inputs, dtype=np.float64)
        values = values.reshape(-1, values.shape[-1])
        batch_sum, batch_squares = values.sum(axis=0), np.square(values).sum(axis=0)
        if total is None:
            return (values.shape[0], batch_sum, batch_squares)
        return (count + values.shape[0], total + batch_sum, squares + batch_squares)

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for count, total, squares in accumulators:
            if total is None:
                continue
            if merged[1] is None:
                merged = (count, total, squares)
            else:
                merged = (merged[0] + count, merged[1] + total, merged[2] + squares)
        return merged

    def extract_output(self, accumulator):
        count, total, squares = accumulator
        if not count:
            return {"mean": [], "std": []}
        mean = total / count
        variance = np.maximum(squares / count - np.square(mean), 0.0)
        return {"mean": [float(m) for m in mean], "std": [float(s) for s in np.sqrt(variance)]}


def _class_counts(examples):
    return (
        examples
        | "Labels" >> beam.Map(lambda example: example.label)
        | "CountPerClass" >> beam.combiners.Count.PerElement()
        | "CollectClassCounts" >> beam.combiners.ToDict()
        | "TagClassCounts" >> beam.Map(lambda counts: ("class_counts", counts))
    )


class AnalyzeArrays(beam.PTransform):
    """Full pass over the train split: mean/std per channel (images) or feature (sequences), class counts."""

    def expand(self, examples):
        channel_stats = (
            examples
            | "Inputs" >> beam.Map(lambda example: example.inputs)
            | "ChannelMeanStd" >> beam.CombineGlobally(ChannelStatsFn())
            | "TagChannelStats" >> beam.Map(lambda stats: ("channel_stats", stats))
        )
        return (channel_stats, _class_counts(examples)) | "MergeStatistics" >> beam.Flatten()


def select_vocabulary(token_counts, max_tokens: int) -> list[str]:
    """The `max_tokens` most frequent tokens, ties broken alphabetically (deterministic)."""
    ranked = sorted(token_counts, key=lambda item: (-item[1], item[0]))
    return [token for token, _ in ranked[:max_tokens]]


class AnalyzeText(beam.PTransform):
    """Full pass over the train split: vocabulary, token-length and character-length histograms,
    class counts."""

    def __init__(self, vocab_size: int, min_count: int, tokenizer: str = "words"):
        super().__init__()
        self._max_tokens = vocab_size - contract_lib.RESERVED_TOKEN_IDS
        self._min_count = min_count
        self._tokenizer = tokenizer  # `data.tokenizer`: the trainer and the export tokenize the same way

    def expand(self, examples):
        min_count, max_tokens, tokenizer = self._min_count, self._max_tokens, self._tokenizer
        tokens = examples | "Tokenize" >> beam.Map(
            lambda example: contract_lib.tokenize_text(example.inputs, tokenizer))
        vocabulary = (
            tokens
            | "AllTokens" >> beam.FlatMap(lambda words: words)
            | "CountTokens" >> beam.combiners.Count.PerElement()
            # and tokens holding a NUL: Keras keeps a vocabulary as NumPy strings, which drop trailing
            # NULs ("a\x00" would become a second "a", "\x00" the mask token); they are out of vocabulary
            | "DropRareTokens" >> beam.Filter(lambda item: item[1] >= min_count and "\x00" not in item[0])
            | "CollectTokens" >> beam.combiners.ToList()
            | "TopTokens" >> beam.Map(select_vocabulary, max_tokens)
            | "TagVocabulary" >> beam.Map(lambda words: ("vocabulary", words))
        )
        lengths = (
            tokens
            | "Lengths" >> beam.Map(len)
            | "CountLengths" >> beam.combiners.Count.PerElement()
            | "CollectLengths" >> beam.combiners.ToDict()
            | "TagLengths" >> beam.Map(lambda counts: ("length_counts", {str(k): v for k, v in counts.items()}))
        )
        characters = (
            examples
            | "CharacterLengths" >> beam.Map(lambda example: len(char_ngram_text(example.inputs)))
            | "CountCharacterLengths" >> beam.combiners.Count.PerElement()
            | "CollectCharacterLengths" >> beam.combiners.ToDict()
            | "TagCharacterLengths" >> beam.Map(
                lambda counts: ("character_length_counts", {str(k): v for k, v in counts.items()}))
        )
        return (vocabulary, lengths, characters, _class_counts(examples)) | "MergeStatistics" >> beam.Flatten()


def length_percentiles(length_counts: dict) -> dict:
    """p50/p90/p95/p99/max of a {length: count} histogram (nearest rank)."""
    lengths = sorted((int(length), count) for length, count in length_counts.items())
    total = sum(count for _, count in lengths)
    result = {}
    for name, q in PERCENTILES:
        rank, seen = max(1, math.ceil(q * total)), 0
        for length, count in lengths:
            seen += count
            if seen >= rank:
                result[name] = length
                break
    return result


def write_summary(items, path: str) -> None:
    """Writes what the pipeline measured (statistics, shards, dead letters) for the driver to read."""
    summary: dict = {"shards": [], **dict.fromkeys(SUMMED, 0)}
    for kind, payload in items:
        if kind == "shard":
            summary["shards"].append(payload)
        elif kind in SUMMED:
            summary[kind] += payload
        else:
            summary[kind] = payload
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(summary, sort_keys=True).encode("utf-8"))
