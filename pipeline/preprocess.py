"""The preprocessing stage: source -> split -> analyze -> encode -> sharded TFRecords + contract.

    python -m pipeline.preprocess --run-dir runs/r1 --source digits -- --runner FnApiRunner

Beam options after `--` pass straight to the runner, so the same command runs on Dataflow
with `--runner DataflowRunner --project P --region R --temp_location gs://b/tmp
--setup_file ./setup.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid

import apache_beam as beam

from kcp import storage
from kcp.config import Config
from pipeline import contract as contract_lib
from pipeline import splits, transforms
from pipeline.sources import SourcePlan, plan_source, read_source

log = logging.getLogger("kcp.preprocess")


def local_runner_defaults(beam_args: list[str]) -> list[str]:
    """Fills in the local runner when the user named none.

    Beam 2.77's plain DirectRunner first tries to download the Prism runner and can hang
    offline, so the local default is the FnApiRunner using every core in subprocesses.
    """
    given = {arg.split("=", 1)[0].lstrip("-") for arg in beam_args if arg.startswith("--")}
    defaults = []
    if "runner" not in given:
        defaults.append("--runner=FnApiRunner")
        if "direct_running_mode" not in given:
            defaults.append("--direct_running_mode=multi_processing")
        if "direct_num_workers" not in given:
            defaults.append(f"--direct_num_workers={os.cpu_count() or 1}")
    return defaults + list(beam_args)


def clear_previous_outputs(data_dir: str) -> None:
    """Removes an earlier run's contract first, then its shards, so a crash never looks complete."""
    metadata = storage.join(data_dir, contract_lib.METADATA_FILE)
    storage.remove(metadata)
    for split in splits.SPLITS:
        for path in storage.glob(storage.join(data_dir, f"{split}-*.tfrecord*")):
            storage.remove(path)
    storage.remove_tree(storage.join(data_dir, "dead_letter"))


def build_pipeline(pipeline: beam.Pipeline, plan: SourcePlan, config: Config, data_dir: str, summary_path: str):
    """Wires Read -> Split -> Analyze -> Encode -> Write onto `pipeline`."""
    data = config.data
    fractions, seed = tuple(data.split), data.seed

    def split_index(example, _num_partitions):
        split = example.split if plan.has_splits else splits.stable_split(example.key, fractions, seed)
        return splits.SPLITS.index(split)

    examples = pipeline | "Read" >> beam.Create(read_source(plan, data.limit), reshuffle=False)
    train, validation, test = examples | "Split" >> beam.Partition(split_index, len(splits.SPLITS))
    statistics = train | "Analyze" >> transforms.AnalyzeImages()

    bytes_per_example = math.prod(plan.input_spec.shape) * (1 if plan.input_spec.dtype == "uint8" else 4) + 64
    shard_summaries, dead_letters = [], []
    for split, split_examples in zip(splits.SPLITS, (train, validation, test)):
        name = split.capitalize()
        encoded = split_examples | f"Encode{name}" >> beam.ParDo(transforms.EncodeExampleFn(plan)).with_outputs(
            transforms.EncodeExampleFn.DEAD_LETTER, main="examples")
        written = encoded.examples | f"Write{name}" >> transforms.WriteShards(
            data_dir, split, data.num_shards, bytes_per_example, data.compression)
        shard_summaries.append(written | f"Tag{name}Shards" >> beam.Map(lambda shard: ("shard", shard)))
        dead_letters.append(encoded[transforms.EncodeExampleFn.DEAD_LETTER])

    all_dead = tuple(dead_letters) | "MergeDeadLetters" >> beam.Flatten()
    _ = all_dead | "WriteDeadLetters" >> beam.io.WriteToText(
        storage.join(data_dir, "dead_letter", "dead_letter"), file_name_suffix=".jsonl", skip_if_empty=True)
    dead_count = (
        all_dead
        | "CountDeadLetters" >> beam.combiners.Count.Globally()
        | "TagDeadLetters" >> beam.Map(lambda count: ("dead_letter", count))
    )
    _ = (
        (statistics, dead_count, *shard_summaries)
        | "MergeSummary" >> beam.Flatten()
        | "CollectSummary" >> beam.combiners.ToList()
        | "WriteSummary" >> beam.Map(transforms.write_summary, summary_path)
    )


def run_preprocess(config: Config, run_dir: str, beam_args: list[str] = ()) -> contract_lib.DataContract:
    """Runs the Beam pipeline and writes `RUN/data/metadata.json` last. Returns the contract."""
    from apache_beam.options.pipeline_options import PipelineOptions

    plan = plan_source(config.data.source)
    data_dir = contract_lib.data_dir(run_dir)
    storage.makedirs(data_dir)
    clear_previous_outputs(data_dir)
    summary_path = storage.join(data_dir, f".summary-{uuid.uuid4().hex[:8]}.json")
    options = PipelineOptions(local_runner_defaults(list(beam_args)))
    log.info("preprocess: reading %s into %s", plan.uri, data_dir)
    with beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, plan, config, data_dir, summary_path)
    summary = json.loads(storage.read_text(summary_path))
    storage.remove(summary_path)
    contract = contract_from_summary(plan, config, summary, data_dir)
    contract_lib.write_contract(run_dir, contract)
    return contract


def contract_from_summary(plan: SourcePlan, config: Config, summary: dict, data_dir: str) -> contract_lib.DataContract:
    """Assembles the contract from what the pipeline measured, filling in empty shards."""
    split_infos = {}
    for split in splits.SPLITS:
        shards = [s for s in summary["shards"] if s["split"] == split]
        num_shards = config.data.num_shards or max([_shards_in_name(s["path"]) for s in shards], default=1)
        written = {s["shard"] for s in shards}
        for shard in range(num_shards):
            if shard not in written:
                _write_empty_shard(data_dir, transforms.shard_name(split, shard, num_shards, config.data.compression))
        split_infos[split] = contract_lib.SplitInfo(
            count=sum(s["count"] for s in shards),
            num_shards=num_shards,
            file_pattern=transforms.shard_pattern(split, num_shards, config.data.compression),
        )
    channel_stats = summary.get("channel_stats", {"mean": [], "std": []})
    statistics = {
        "mean": channel_stats["mean"],
        "std": channel_stats["std"],
        "class_counts": {name: summary.get("class_counts", {}).get(name, 0) for name in plan.class_names},
    }
    return contract_lib.DataContract(
        modality=plan.modality,
        input_feature=plan.input_feature,
        input_spec=plan.input_spec,
        class_names=plan.class_names,
        splits=split_infos,
        statistics=statistics,
        compression=config.data.compression,
        source=plan.uri,
        bad_examples=summary["dead_letters"],
    )


def _shards_in_name(path: str) -> int:
    return int(path.rsplit("-of-", 1)[1].split(".", 1)[0])


def _write_empty_shard(directory: str, name: str) -> None:
    """A shard no key hashed to: an empty TFRecord file, so every NNNNN-of-MMMMM exists."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    compression = CompressionTypes.GZIP if name.endswith(".gz") else CompressionTypes.UNCOMPRESSED
    with FileSystems.create(FileSystems.join(directory, name), compression_type=compression):
        pass


def main(argv: list[str] | None = None) -> int:
    from kcp import cli

    return cli.main(["preprocess", *(argv if argv is not None else cli.sys_argv())], lenient=True)


if __name__ == "__main__":
    raise SystemExit(main())
