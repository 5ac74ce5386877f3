"""Composite PTransforms and the pure functions behind them.

Per-element work is in plain functions and DoFns that can be tested without Beam; the
`expand()` methods only wire steps together, each with a unique CamelCase label.
"""

from __future__ import annotations

import json
import math
import uuid

import apache_beam as beam
import numpy as np

from pipeline import augment as augment_lib
from kcp.core import contract as contract_lib
from pipeline.sources import BadInput, RawExample, SourcePlan, SourceRecord, decode_record
from pipeline.splits import stable_fraction
TARGET_SHARD_BYTES = 64 * 2**20
MAX_SHARDS = 1024


def shard_count(num_examples: int, bytes_per_example: int) -> int:
    """Shards for a split so that each is about TARGET_SHARD_BYTES, at least 1."""
    estimated = num_examples * max(1, bytes_per_example)
    return int(min(MAX_SHARDS, max(1, math.ceil(estimated / TARGET_SHARD_BYTES))))


def assign_shard(record, num_shards: int):
    """(key, value) -> (shard id, (key, value)); salted apart from the split hash, so the
    shards of a split are evenly filled whatever `data.seed` is."""
    return int(stable_fraction(record[0], "shard") * num_shards), record


def shard_name(split: str, shard: int, num_shards: int, compression: str) -> str:
    suffix = ".tfrecord.gz" if compression == "gzip" else ".tfrecord"
    return f"{split}-{shard:05d}-of-{num_shards:05d}{suffix}"


def shard_pattern(split: str, num_shards: int, compression: str) -> str:
    return shard_name(split, 0, num_shards, compression).replace("00000-of", "*-of", 1)


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


DEAD_LETTER = "dead_letter"
EXAMPLE = "example"


def select(tagged, tag: str, label: str):
    """The values tagged `tag` in a PCollection of (tag, value).

    Used instead of multi-output ParDos and Partition: Beam 2.77's Dask runner sent every
    element to every output of those, duplicating the data; a Filter works on every runner.
    """
    return tagged | f"{label}Select" >> beam.Filter(lambda item: item[0] == tag) \
        | f"{label}Values" >> beam.Map(lambda item: item[1])


def decode_or_dead_letter(record: SourceRecord, plan: SourcePlan):
    """SourceRecord -> (EXAMPLE, RawExample), or (DEAD_LETTER, json line) with the reason."""
    try:
        return EXAMPLE, decode_record(plan, record)
    except BadInput as error:
        return DEAD_LETTER, dead_letter(record.key, plan.uri, str(error))


def encode_or_dead_letter(example: RawExample, plan: SourcePlan, label_index: dict):
    """RawExample -> (EXAMPLE, (key, serialized tf.train.Example)), or a dead letter."""
    label = label_index.get(example.label)
    if label is None:
        return DEAD_LETTER, dead_letter(example.key, plan.uri, f"unknown label {example.label!r}")
    try:
        serialized = contract_lib.encode_example(plan.input_spec, plan.input_feature, example.key, example.inputs, label)
    except ValueError as error:
        return DEAD_LETTER, dead_letter(example.key, plan.uri, str(error))
    return EXAMPLE, (example.key, serialized)


def with_augmented_copies(example: RawExample, modality: str, config):
    """The example itself, then its `config.copies` augmented copies."""
    yield example
    for key, inputs in augment_lib.augmented_copies(example.key, example.inputs, modality, config):
        yield RawExample(key, inputs, example.label, example.split)


ANALYZE = "analyze"
AUGMENTED = "augmented"


def process_record(record: SourceRecord, plan: SourcePlan, assign, label_index: dict, augment_config):
    """One source record through decode -> split -> augment (train only) -> encode, in one step.

    Yields tagged items: (DEAD_LETTER, json line) for a record or copy that cannot be used;
    (ANALYZE, RawExample) for each train original (the full-pass statistics); (split,
    (key, serialized Example)) for the example and its copies; (AUGMENTED, copies made).
    One fused step instead of a chain of Map/Filter steps: Beam's per-element cost is paid
    once per record, not once per step.
    """
    tag, example = decode_or_dead_letter(record, plan)
    if tag == DEAD_LETTER:
        yield tag, example
        return
    split = assign(example)
    examples = [example]
    if split == "train":
        yield ANALYZE, example
        if augment_config.copies:
            examples = list(with_augmented_copies(example, plan.modality, augment_config))
            yield AUGMENTED, len(examples) - 1
    for item in examples:
        tag, value = encode_or_dead_letter(item, plan, label_index)
        yield (split if tag == EXAMPLE else tag), value


def dead_letter(key: str, source: str, reason: str) -> str:
    return json.dumps({"key": key, "source": source, "reason": reason}, sort_keys=True)


def _tfrecord_util():
    from apache_beam.io.tfrecordio import _TFRecordUtil  # Beam's TFRecord framing (length + CRC32C)

    return _TFRecordUtil


class _WritePartsFn(beam.DoFn):
    """Appends each (key, serialized) record to this bundle's part file for its shard, and at
    the end of the bundle outputs (shard, part path): only file names go through the group.

    A part holds (key, record) pairs in TFRecord framing. A retried bundle writes new parts
    under new names; the parts of a failed attempt are never named downstream and go with
    the parts folder when the run ends.
    """

    def __init__(self, parts_dir: str, split: str, num_shards: int):
        self._parts_dir, self._split, self._num_shards = parts_dir, split, num_shards
        self._open = {}

    def setup(self):
        from apache_beam.io.filesystems import FileSystems

        self._filesystems, self._util = FileSystems, _tfrecord_util()

    def start_bundle(self):
        self._open = {}

    def process(self, record):
        shard = assign_shard(record, self._num_shards)[0]
        if shard not in self._open:
            path = self._filesystems.join(self._parts_dir, f"{self._split}-{shard:05d}-{uuid.uuid4().hex}.part")
            self._open[shard] = (path, self._filesystems.create(path))
        handle = self._open[shard][1]
        self._util.write_record(handle, record[0].encode("utf-8"))
        self._util.write_record(handle, record[1])

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        opened, self._open = self._open, {}
        for shard, (path, handle) in sorted(opened.items()):
            handle.close()
            yield GlobalWindows.windowed_value((shard, path))


def read_part(path: str) -> list:
    """The (key, record) pairs of one part file."""
    from apache_beam.io.filesystems import FileSystems

    util, pairs = _tfrecord_util(), []
    with FileSystems.open(path) as handle:
        while True:
            key = util.read_record(handle)
            if key is None:
                return pairs
            pairs.append((key.decode("utf-8"), util.read_record(handle)))


class _WriteShardFn(beam.DoFn):
    """Writes one shard from its parts (or its grouped records): the records sorted by key, to
    a temporary name renamed at the end.

    Sorting makes every rerun byte-identical per shard; the rename means a retried or
    crashed bundle never leaves a half-written file under the final name. Parts are not
    deleted here (a retried bundle must find them again); the driver removes their folder.
    """

    def __init__(self, directory: str, split: str, compression: str):
        self._directory = directory
        self._split = split
        self._compression = compression

    def process(self, shard_and_items, num_shards):
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.io.filesystem import CompressionTypes

        shard, items = shard_and_items  # part file names, or the (key, record) pairs themselves
        records = sorted(pair for item in items for pair in (read_part(item) if isinstance(item, str) else [item]))
        final = FileSystems.join(self._directory, shard_name(self._split, shard, num_shards, self._compression))
        temporary = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        compression = CompressionTypes.GZIP if self._compression == "gzip" else CompressionTypes.UNCOMPRESSED
        util = _tfrecord_util()
        with FileSystems.create(temporary, compression_type=compression) as handle:
            for _, serialized in records:
                util.write_record(handle, serialized)
        if FileSystems.exists(final):
            FileSystems.delete([final])
        FileSystems.rename([temporary], [final])
        yield {"split": self._split, "shard": shard, "path": final, "count": len(records)}


class WriteShards(beam.PTransform):
    """(key, serialized Example) -> `num_shards` TFRecord files; outputs one summary dict per shard.

    Each record goes to the shard `stable_fraction(key) * num_shards`, so shard contents do
    not depend on the runner or the number of workers. Workers append records to per-bundle
    part files under `parts_dir`; only the part names are grouped by shard, and each shard
    is then written from its parts, sorted by key. The records themselves never go through
    the runner's shuffle. With `parts_dir=None` the records themselves are grouped instead:
    Beam 2.77's Dask runner drops what `finish_bundle` outputs, so the part names never
    arrive there (the same bug made WriteToTFRecord write an empty file while reporting
    success). Both ways give the same bytes. The shard count is fixed before the pipeline
    runs (from the planned record count).
    """

    def __init__(self, directory: str, split: str, num_shards: int, compression: str, parts_dir: str | None):
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        self._directory, self._split = directory, split
        self._num_shards, self._compression = num_shards, compression
        self._parts_dir = parts_dir

    def expand(self, records):
        if self._parts_dir is None:
            grouped = (records
                       | "AssignShard" >> beam.Map(assign_shard, self._num_shards)
                       | "GroupByShard" >> beam.GroupByKey())
        else:
            grouped = (records
                       | "WriteParts" >> beam.ParDo(_WritePartsFn(self._parts_dir, self._split, self._num_shards))
                       | "GroupPartsByShard" >> beam.GroupByKey())
        return (
            grouped
            | "WriteShard" >> beam.ParDo(_WriteShardFn(self._directory, self._split, self._compression),
                                         self._num_shards)
        )


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
    """Full pass over the train split: vocabulary, token-length histogram, class counts."""

    def __init__(self, vocab_size: int, min_count: int):
        super().__init__()
        self._max_tokens = vocab_size - contract_lib.RESERVED_TOKEN_IDS
        self._min_count = min_count

    def expand(self, examples):
        min_count, max_tokens = self._min_count, self._max_tokens
        tokens = examples | "Tokenize" >> beam.Map(lambda example: contract_lib.standardize_text(example.inputs))
        vocabulary = (
            tokens
            | "AllTokens" >> beam.FlatMap(lambda words: words)
            | "CountTokens" >> beam.combiners.Count.PerElement()
            | "DropRareTokens" >> beam.Filter(lambda item: item[1] >= min_count)
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
        return (vocabulary, lengths, _class_counts(examples)) | "MergeStatistics" >> beam.Flatten()


def length_percentiles(length_counts: dict) -> dict:
    """p50/p90/p95/p99/max of a {length: count} histogram (nearest rank)."""
    lengths = sorted((int(length), count) for length, count in length_counts.items())
    total = sum(count for _, count in lengths)
    result = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
        rank, seen = max(1, math.ceil(q * total)), 0
        for length, count in lengths:
            seen += count
            if seen >= rank:
                result[name] = length
                break
    return result


def write_summary(items, path: str) -> None:
    """Writes what the pipeline measured (statistics, shards, dead letters) for the driver to read."""
    from apache_beam.io.filesystems import FileSystems

    summary: dict = {"shards": [], "dead_letters": 0, "read": 0, "augmented": 0}
    for kind, payload in items:
        if kind == "shard":
            summary["shards"].append(payload)
        elif kind in ("dead_letters", "read", "augmented"):
            summary[kind] += payload
        else:
            summary[kind] = payload
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(summary, sort_keys=True).encode("utf-8"))
