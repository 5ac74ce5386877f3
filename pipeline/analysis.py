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

    Each batch's count, mean and sum of squared deviations are merged by Chan et al.'s pairwise
    formula, in float64: no E[x^2] - mean^2 cancellation, so a feature with a large offset (a
    timestamp of 1.7e9, kelvins) keeps its true spread (0 for a constant).
    """

    def create_accumulator(self):
        return (0, None, None)  # (values per channel, mean, sum of squared deviations from it)

    @staticmethod
    def _merge(left, right):
        count, mean, deviations = left
        other_count, other_mean, other_deviations = right
        if mean is None:
            return right
        if other_mean is None:
            return left
        total = count + other_count
        delta = other_mean - mean
        return (total, mean + delta * (other_count / total),
                deviations + other_deviations + np.square(delta) * (count * other_count / total))

    def add_input(self, accumulator, inputs):
        values = np.asarray(inputs, dtype=np.float64)
        values = values.reshape(-1, values.shape[-1])
        if not values.shape[0]:
            return accumulator
        mean = values.mean(axis=0)
        return self._merge(accumulator, (values.shape[0], mean, np.square(values - mean).sum(axis=0)))

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            merged = self._merge(merged, accumulator)
        return merged

    def extract_output(self, accumulator):
        count, mean, deviations = accumulator
        if not count:
            return {"mean": [], "std": []}
        return {"mean": [float(m) for m in mean], "std": [float(s) for s in np.sqrt(deviations / count)]}


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
