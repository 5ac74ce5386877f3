"""The preprocessing stage: source -> split -> analyze -> encode -> sharded TFRecords + contract.

    python -m pipeline.task --run-dir runs/r1 --source digits -- --runner FnApiRunner

Beam options after `--` pass straight to the runner, so the same command runs on Dataflow
with `--runner DataflowRunner --project P --region R --temp_location gs://b/tmp
--setup_file ./setup.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from kcp.core import contract as contract_lib
from kcp.core import storage
from kcp.core.beamio import DEAD_LETTER, local_runner_defaults, select
from kcp.core.config import Config
from kcp.core.errors import UserError
from kcp.core.layout import DEAD_LETTER_DIR
from kcp.core.sources import SourcePlan, plan_source
from pipeline import splits
from pipeline.analysis import AnalyzeArrays, AnalyzeText, length_percentiles, write_summary
from pipeline.records import ANALYZE, AUGMENTED, process_record
from pipeline.samples import write_samples
from pipeline.shards import WriteShards, shard_count, shard_name, shard_pattern

log = logging.getLogger("kcp.preprocess")

PARTS_PREFIX = ".parts-"  # per-bundle record parts while the shards are written


def drops_finish_bundle_outputs(runner) -> bool:
    """Beam 2.77's Dask runner loses the elements a DoFn outputs from `finish_bundle`."""
    return "dask" in str(runner).lower()


def clear_previous_outputs(data_dir: str) -> None:
    """Removes an earlier run's contract first, then its shards, so a crash never looks complete."""
    metadata = storage.join(data_dir, contract_lib.METADATA_FILE)
    storage.remove(metadata)
    for split in splits.SPLITS:
        for path in storage.glob(storage.join(data_dir, f"{split}-*.tfrecord*")):
            storage.remove(path)
    storage.remove_tree(storage.join(data_dir, DEAD_LETTER_DIR))
    for path in storage.glob(storage.join(data_dir, f"{PARTS_PREFIX}*")):  # a killed run's parts
        storage.remove_tree(path)


def split_assigner(plan: SourcePlan, records: list, fractions, seed):
    """Returns example -> split name: given splits are kept; the rest by the stable key hash.

    A source that brings train (and test) but no validation split gets its validation carved
    out of train by the same hash, with the fraction validation / (train + validation).
    """
    carve = plan.has_splits and not any(record.split == "validation" for record in records)
    carve_fractions = (fractions[0] / (fractions[0] + fractions[1]), fractions[1] / (fractions[0] + fractions[1]), 0.0)

    def assign(example) -> str:
        if example.split is None:
            return splits.stable_split(example.key, fractions, seed)
        if carve and example.split == "train":
            return splits.stable_split(example.key, carve_fractions, seed)
        return example.split

    return assign


def planned_counts(records: list, assign, copies: int) -> dict:
    """Records each split will get if every input decodes, known before the pipeline runs:
    the shard count of a split comes from it, so no step has to wait for a count."""
    counts = dict.fromkeys(splits.SPLITS, 0)
    for record in records:
        counts[assign(record)] += 1
    counts["train"] *= 1 + copies
    return counts


def build_pipeline(pipeline: beam.Pipeline, plan: SourcePlan, records: list, config: Config, data_dir: str,
                   summary_path: str, parts_dir: str | None):
    """Wires Read -> (Decode -> Split -> Augment -> Encode, fused) -> Analyze / Write onto `pipeline`."""
    data = config.data
    assign = split_assigner(plan, records, tuple(data.split), data.seed)

    read = pipeline | "Read" >> beam.Create(records)
    label_index = {name: index for index, name in enumerate(plan.class_names)}
    processed = read | "DecodeSplitAugmentEncode" >> beam.FlatMap(
        process_record, plan, assign, label_index, data.augment)
    train = select(processed, ANALYZE, "TrainOriginals")
    if plan.modality == "text":
        statistics = train | "Analyze" >> AnalyzeText(data.vocab_size, data.min_count)
    else:
        statistics = train | "Analyze" >> AnalyzeArrays()
    counters = [read | "CountRead" >> beam.combiners.Count.Globally() | "TagRead" >> beam.Map(lambda n: ("read", n))]
    if data.augment.copies:
        counters.append(
            select(processed, AUGMENTED, "Augmented")
            | "CountAugmented" >> beam.CombineGlobally(sum)
            | "TagAugmented" >> beam.Map(lambda n: ("augmented", n)))

    bytes_per_example = 256 if plan.modality == "text" else \
        math.prod(plan.input_spec.shape) * (1 if plan.input_spec.dtype == "uint8" else 4) + 64
    planned = planned_counts(records, assign, data.augment.copies)
    shard_summaries = []
    dead_letters = [select(processed, DEAD_LETTER, "DeadLetters")]
    for split in splits.SPLITS:
        name = split.capitalize()
        num_shards = data.num_shards or shard_count(planned[split], bytes_per_example)
        written = select(processed, split, f"Encoded{name}") | f"Write{name}" >> \
            WriteShards(data_dir, split, num_shards, data.compression, parts_dir)
        shard_summaries.append(written | f"Tag{name}Shards" >> beam.Map(lambda shard: ("shard", shard)))

    all_dead = tuple(dead_letters) | "MergeDeadLetters" >> beam.Flatten()
    _ = all_dead | "WriteDeadLetters" >> beam.io.WriteToText(
        storage.join(data_dir, DEAD_LETTER_DIR, "dead_letter"), file_name_suffix=".jsonl", skip_if_empty=True)
    counters.append(
        all_dead
        | "CountDeadLetters" >> beam.combiners.Count.Globally()
        | "TagDeadLetters" >> beam.Map(lambda count: ("dead_letters", count)))
    _ = (
        (statistics, *counters, *shard_summaries)
        | "MergeSummary" >> beam.Flatten()
        | "CollectSummary" >> beam.combiners.ToList()
        | "WriteSummary" >> beam.Map(write_summary, summary_path)
    )


def run_preprocess(config: Config, run_dir: str, beam_args: list[str] = (), report=None) -> contract_lib.DataContract:
    """Runs the Beam pipeline and writes `RUN/data/metadata.json` last. Returns the contract.

    `report(line)` receives a line per stage. Fails (UserError) without writing the contract
    when more than `data.max_bad_fraction` of the inputs could not be read.
    """
    report = report or (lambda line: log.info("%s", line))
    plan, records = plan_source(config.data.source, config.data)
    shape = "x".join(map(str, plan.input_spec.shape)) or "string"
    report(f"plan: {len(records)} inputs, {len(plan.class_names)} classes, {plan.modality} {shape}, "
           f"splits {'from the source' if plan.has_splits else 'by key hash'}")
    data_dir = contract_lib.data_dir(run_dir)
    storage.makedirs(data_dir)
    clear_previous_outputs(data_dir)
    summary_path = storage.join(data_dir, f".summary-{uuid.uuid4().hex[:8]}.json")
    options = PipelineOptions(local_runner_defaults(list(beam_args)))
    report(f"beam: {options.get_all_options()['runner']} running Read > Decode > Split > Analyze > "
           f"{'Augment > ' if config.data.augment.copies else ''}Encode > Write")
    parts_dir = storage.join(data_dir, f"{PARTS_PREFIX}{uuid.uuid4().hex[:8]}")
    if drops_finish_bundle_outputs(options.get_all_options()["runner"]):
        parts_dir = None  # the shard writer groups the records themselves there
    try:
        with beam.Pipeline(options=options) as pipeline:
            build_pipeline(pipeline, plan, records, config, data_dir, summary_path, parts_dir)
    finally:
        if parts_dir:
            storage.remove_tree(parts_dir)
    summary = json.loads(storage.read_text(summary_path))
    storage.remove(summary_path)
    bad, read = summary["dead_letters"], summary["read"]
    if read and bad / read > config.data.max_bad_fraction:
        raise UserError(f"data.max_bad_fraction: {bad} of {read} inputs ({bad / read:.1%}) could not be read, above "
                        f"{config.data.max_bad_fraction:.1%}; reasons in {storage.join(data_dir, DEAD_LETTER_DIR)}")
    contract, vocabulary = contract_from_summary(plan, config, summary, data_dir)
    if contract.splits["train"].count:
        write_samples(contract, run_dir)
    contract_lib.write_contract(run_dir, contract, vocabulary)
    for line in counts_table(contract, read, bad, summary["augmented"]):
        report(line)
    return contract


def counts_table(contract, read: int, bad: int, augmented: int) -> list[str]:
    """The closing table: read, bad, written per split, augmented copies."""
    rows = [("read", read), ("bad", bad)] + [(f"{split} written", info.count) for split, info in contract.splits.items()]
    rows.append(("augmented copies", augmented))
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {value:>9,}" for name, value in rows]


def contract_from_summary(plan: SourcePlan, config: Config, summary: dict, data_dir: str):
    """Assembles the contract (and the vocabulary, for text) from what the pipeline measured."""
    split_infos = {}
    for split in splits.SPLITS:
        shards = [s for s in summary["shards"] if s["split"] == split]
        num_shards = config.data.num_shards or max([_shards_in_name(s["path"]) for s in shards], default=1)
        written = {s["shard"] for s in shards}
        for shard in range(num_shards):
            if shard not in written:
                _write_empty_shard(data_dir, shard_name(split, shard, num_shards, config.data.compression))
        split_infos[split] = contract_lib.SplitInfo(
            count=sum(s["count"] for s in shards),
            num_shards=num_shards,
            file_pattern=shard_pattern(split, num_shards, config.data.compression),
        )
    class_counts = summary.get("class_counts", {})
    statistics = {"class_counts": {name: class_counts.get(name, 0) for name in plan.class_names}}
    vocabulary = None
    if plan.modality == "text":
        vocabulary = summary.get("vocabulary", [])
        percentiles = length_percentiles(summary.get("length_counts", {})) or {"p95": 1}
        statistics.update({
            "vocab_size": len(vocabulary) + contract_lib.RESERVED_TOKEN_IDS,
            "max_length": int(config.data.max_length or max(1, percentiles["p95"])),
            "length_percentiles": percentiles,
        })
    else:
        channel_stats = summary.get("channel_stats", {"mean": [], "std": []})
        statistics.update({"mean": channel_stats["mean"], "std": channel_stats["std"]})
    contract = contract_lib.DataContract(
        modality=plan.modality,
        input_feature=plan.input_feature,
        input_spec=plan.input_spec,
        class_names=plan.class_names,
        splits=split_infos,
        statistics=statistics,
        compression=config.data.compression,
        source=plan.uri,
        bad_examples=summary["dead_letters"],
        augmentation={"copies": config.data.augment.copies, **(
            dataclasses.asdict(config.data.augment) if config.data.augment.copies else {})},
    )
    return contract, vocabulary


def _shards_in_name(path: str) -> int:
    return int(path.rsplit("-of-", 1)[1].split(".", 1)[0])


def _write_empty_shard(directory: str, name: str) -> None:
    """A shard no key hashed to: an empty TFRecord file, so every NNNNN-of-MMMMM exists."""
    compression = CompressionTypes.GZIP if name.endswith(".gz") else CompressionTypes.UNCOMPRESSED
    with FileSystems.create(FileSystems.join(directory, name), compression_type=compression):
        pass
