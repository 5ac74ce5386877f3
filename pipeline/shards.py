"""The shard writer: (key, serialized Example) -> `num_shards` TFRecord files per split, each
sorted by key, so every rerun on any runner gives the same bytes."""

from __future__ import annotations

import math
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil  # Beam's TFRecord framing (length + CRC32C)
from apache_beam.transforms.window import GlobalWindows

from kcp.core.storage import fault_point
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


def _num_shards(fixed: int | None, facts, split: str) -> int:
    """The shard count: fixed when the transform was built, else from the facts side input."""
    return fixed if fixed else facts["num_shards"][split]


class _WritePartsFn(beam.DoFn):
    """Appends each (key, serialized) record to this bundle's part file for its shard, and at
    the end of the bundle outputs (shard, part path): only file names go through the group.

    A part holds (key, record) pairs in TFRecord framing. A retried bundle writes new parts
    under new names; the parts of a failed attempt are never named downstream and go with
    the parts folder when the run ends.
    """

    def __init__(self, parts_dir: str, split: str, num_shards: int | None):
        self._parts_dir, self._split, self._num_shards = parts_dir, split, num_shards
        self._open = {}

    def start_bundle(self):
        self._open = {}

    def process(self, record, facts=None):
        shard = assign_shard(record, _num_shards(self._num_shards, facts, self._split))[0]
        if shard not in self._open:
            path = FileSystems.join(self._parts_dir, f"{self._split}-{shard:05d}-{uuid.uuid4().hex}.part")
            self._open[shard] = (path, FileSystems.create(path))
        handle = self._open[shard][1]
        _TFRecordUtil.write_record(handle, record[0].encode("utf-8"))
        _TFRecordUtil.write_record(handle, record[1])

    def finish_bundle(self):
        opened, self._open = self._open, {}
        for shard, (path, handle) in sorted(opened.items()):
            handle.close()
            yield GlobalWindows.windowed_value((shard, path))


def read_part(path: str) -> list:
    """The (key, record) pairs of one part file."""
    pairs = []
    with FileSystems.open(path) as handle:
        while True:
            key = _TFRecordUtil.read_record(handle)
            if key is None:
                return pairs
            pairs.append((key.decode("utf-8"), _TFRecordUtil.read_record(handle)))


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

    def process(self, shard_and_items, num_shards, facts=None):
        num_shards = _num_shards(num_shards, facts, self._split)
        shard, items = shard_and_items  # part file names, or the (key, record) pairs themselves
        records = sorted(pair for item in items for pair in (read_part(item) if isinstance(item, str) else [item]))
        final = FileSystems.join(self._directory, shard_name(self._split, shard, num_shards, self._compression))
        write_records(final, (serialized for _, serialized in records), self._compression)
        yield {"split": self._split, "shard": shard, "path": final, "count": len(records)}


def write_records(final: str, records, compression: str) -> None:
    """Writes serialized records as one TFRecord file: to a temporary name, renamed at the end,
    so a retried or crashed bundle never leaves a half-written file under the final name."""
    temporary = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    kind = CompressionTypes.GZIP if compression == "gzip" else CompressionTypes.UNCOMPRESSED
    with FileSystems.create(temporary, compression_type=kind) as handle:
        for serialized in records:
            _TFRecordUtil.write_record(handle, serialized)
    fault_point("before", final)  # KCP_KILL_AT=before:<shard name>: written, not yet under its final name
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([temporary], [final])
    fault_point("after", final)


class WriteShards(beam.PTransform):
    """(key, serialized Example) -> `num_shards` TFRecord files; outputs one summary dict per shard.

    Each record goes to the shard `stable_fraction(key) * num_shards`, so shard contents do
    not depend on the runner or the number of workers. Workers append records to per-bundle
    part files under `parts_dir`; only the part names are grouped by shard, and each shard
    is then written from its parts, sorted by key. The records themselves never go through
    the runner's shuffle. With `parts_dir=None` the records themselves are grouped instead:
    Beam 2.77's Dask runner drops what `finish_bundle` outputs, so the part names never
    arrive there (the same bug made WriteToTFRecord write an empty file while reporting
    success). Both ways give the same bytes. The shard count is either fixed (`num_shards`)
    or read from the `facts` side input (`facts["num_shards"][split]`, from the records the
    split will get), which the workers compute before the first record is written.
    """

    def __init__(self, directory: str, split: str, num_shards: int | None, compression: str, parts_dir: str | None,
                 facts=None):
        super().__init__()
        if num_shards is None and facts is None:
            raise ValueError("WriteShards needs num_shards or the facts side input")
        if num_shards is not None and num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        self._directory, self._split = directory, split
        self._num_shards, self._compression = num_shards, compression
        self._parts_dir = parts_dir
        self._facts = facts

    def expand(self, records):
        side = (self._facts,) if self._facts is not None else ()
        split, fixed = self._split, self._num_shards
        if self._parts_dir is None:
            grouped = (records
                       | "AssignShard" >> beam.Map(
                           lambda record, facts=None: assign_shard(record, _num_shards(fixed, facts, split)), *side)
                       | "GroupByShard" >> beam.GroupByKey())
        else:
            grouped = (records
                       | "WriteParts" >> beam.ParDo(_WritePartsFn(self._parts_dir, self._split, self._num_shards), *side)
                       | "GroupPartsByShard" >> beam.GroupByKey())
        return (
            grouped
            | "WriteShard" >> beam.ParDo(_WriteShardFn(self._directory, self._split, self._compression),
                                         self._num_shards, *side)
        )
