"""The preprocessing stage: source -> split -> analyze -> encode -> sharded TFRecords + contract.

    python -m pipeline.task --run-dir runs/r1 --source digits -- --runner FnApiRunner

Beam options after `--` pass straight to the runner, so the same command runs on Dataflow
with `--runner DataflowRunner --project P --region R --temp_location gs://b/tmp
--setup_file ./setup.py`.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from kcp.core import contract as contract_lib
from kcp.core import storage
from kcp.core.beamio import (DEAD_LETTER, CountProgress, ProgressReporter, ReadSource, checked_pipeline,
                             for_cluster_workers, local_runner_defaults, progress_directory, select)
from kcp.core.config import Config
from kcp.core.families import MODEL_FAMILIES, check_family_takes
from kcp.core.errors import UserError
from kcp.core.layout import DEAD_LETTER_DIR
from kcp.core.sources import (SourceError, SourcePlan, class_names_of, folder_warning_lines, plan_source, skipped_line,
                              source_path, unserved_line)
from pipeline import splits
from pipeline.analysis import AnalyzeArrays, AnalyzeText, write_summary
from pipeline.language import build_language_pipeline, language_contract
from pipeline.records import ANALYZE, AUGMENTED, process_record
from pipeline.samples import write_samples
from pipeline.summary import (contract_from_summary, counts_table, empty_validation_warning,
                             imbalanced_classes_warning, lookalike_classes_warning, sparse_classes_warning,
                             untrained_classes_warning)
from pipeline.publish import PARTS_PREFIX, STAGING_PREFIX, SUMMARY_PREFIX, clear_leftovers, discard, publish
from pipeline.shards import WriteShards, shard_count

log = logging.getLogger("kcp.preprocess")


def drops_finish_bundle_outputs(runner) -> bool:
    """Beam 2.77's Dask runner loses the elements a DoFn outputs from `finish_bundle`."""
    return "dask" in str(runner).lower()


def carve_fractions(fractions) -> tuple:
    """The fractions that carve validation out of a source's train split."""
    train, validation = fractions[0], fractions[1]
    return (train / (train + validation), validation / (train + validation), 0.0)


def split_assigner(carve: bool, fractions, seed):
    """Returns example -> split name: given splits are kept; the rest by the stable key hash.

    A source that brings train (and test) but no validation split (`carve`) gets its
    validation carved out of train by the same hash, with the fraction validation /
    (train + validation).
    """
    carved = carve_fractions(fractions)

    def assign(example) -> str:
        if example.split is None:
            return splits.stable_split(example.key, fractions, seed)
        if carve and example.split == "train":
            return splits.stable_split(example.key, carved, seed)
        return example.split

    return assign


class SourceFactsFn(beam.CombineFn):
    """What the driver no longer learns by reading every row, computed by the workers in one
    combiner over the records (keys and labels only): the class names (when the plan does not
    know them), whether the source brings its own splits, and the records each split will get
    if every input decodes, from which each split's shard count follows. The result is a side
    input of the per-record step and the shard writers, and goes into the summary.
    """

    def __init__(self, plan: SourcePlan, data, bytes_per_example: int):
        self._plan, self._data, self._bytes = plan, data, bytes_per_example

    def create_accumulator(self):
        return set(), collections.Counter()

    def add_input(self, accumulator, record):
        labels, counts = accumulator
        if record.label and not record.problem:
            labels.add(record.label)
        fractions, seed = tuple(self._data.split), self._data.seed
        if record.split is None:
            counts["hash:" + splits.stable_split(record.key, fractions, seed)] += 1
        else:
            counts["given:" + record.split] += 1
            if record.split == "train":
                counts["carve:" + splits.stable_split(record.key, carve_fractions(fractions), seed)] += 1
        return labels, counts

    def merge_accumulators(self, accumulators):
        labels, counts = set(), collections.Counter()
        for more_labels, more_counts in accumulators:
            labels |= more_labels
            counts.update(more_counts)
        return labels, counts

    def extract_output(self, accumulator):
        labels, counts = accumulator
        plan, data = self._plan, self._data
        has_splits = plan.has_splits if plan.has_splits is not None else \
            any(key.startswith("given:") for key in counts)
        carve = bool(has_splits) and not counts["given:validation"]
        planned = {}
        for split in splits.SPLITS:
            given = counts[f"given:{split}"] if not (carve and split == "train") else counts[f"carve:{split}"]
            if carve and split == "validation":
                given = counts["carve:validation"]
            planned[split] = counts[f"hash:{split}"] + given
        planned["train"] *= 1 + data.augment.copies
        return {
            "class_names": list(plan.class_names or class_names_of(labels)),
            "has_splits": bool(has_splits),
            "carve": carve,
            "planned": planned,
            "num_shards": {split: data.num_shards or shard_count(planned[split], self._bytes)
                           for split in splits.SPLITS},
        }


class _ProcessFn(beam.DoFn):
    """`process_record` with the split assignment and label index built from the facts side input."""

    def __init__(self, plan: SourcePlan, data):
        self._plan, self._data = plan, data
        self._cached = None

    def process(self, record, facts):
        if self._cached is None or self._cached[0] is not facts:
            assign = split_assigner(facts["carve"], tuple(self._data.split), self._data.seed)
            label_index = {name: index for index, name in enumerate(facts["class_names"])}
            self._cached = (facts, assign, label_index)
        _, assign, label_index = self._cached
        yield from process_record(record, self._plan, assign, label_index, self._data.augment)


def bytes_per_example(plan: SourcePlan) -> int:
    """The size estimate behind the shard count: the shard count of a split comes from it."""
    if plan.modality == "text":
        return 256
    return math.prod(plan.input_spec.shape) * (1 if plan.input_spec.dtype == "uint8" else 4) + 64


def build_pipeline(pipeline: beam.Pipeline, plan: SourcePlan, config: Config, data_dir: str,
                   summary_path: str, parts_dir: str | None, progress_dir: str | None = None):
    """Wires Read -> (Decode -> Split -> Augment -> Encode, fused) -> Analyze / Write onto `pipeline`.

    The graph holds the plan and its read tasks, never the data. The source is read twice,
    both times on the workers: once for the facts (keys and labels into one combiner), once
    for the examples, which then flow through decode, encode and the part writers without a
    stage boundary, so no runner has to hold the records between stages.
    """
    data = config.data
    facts = (pipeline
             | "ReadKeys" >> ReadSource(plan)
             | "Facts" >> beam.CombineGlobally(SourceFactsFn(plan, data, bytes_per_example(plan))))
    facts_view = beam.pvalue.AsSingleton(facts)

    read = pipeline | "Read" >> ReadSource(plan)
    if progress_dir:
        read = read | "Progress" >> beam.ParDo(CountProgress(progress_dir))
    processed = read | "DecodeSplitAugmentEncode" >> beam.ParDo(_ProcessFn(plan, data), facts_view)
    train = select(processed, ANALYZE, "TrainOriginals")
    if plan.modality == "text":
        statistics = train | "Analyze" >> AnalyzeText(data.vocab_size, data.min_count, data.tokenizer)
    else:
        statistics = train | "Analyze" >> AnalyzeArrays()
    counters = [read | "CountRead" >> beam.combiners.Count.Globally() | "TagRead" >> beam.Map(lambda n: ("read", n)),
                facts | "TagFacts" >> beam.Map(lambda value: ("facts", value))]
    if data.augment.copies:
        counters.append(
            select(processed, AUGMENTED, "Augmented")
            | "CountAugmented" >> beam.CombineGlobally(sum)
            | "TagAugmented" >> beam.Map(lambda n: ("augmented", n)))

    shard_summaries = []
    dead_letters = [select(processed, DEAD_LETTER, "DeadLetters")]
    for split in splits.SPLITS:
        name = split.capitalize()
        written = select(processed, split, f"Encoded{name}") | f"Write{name}" >> \
            WriteShards(data_dir, split, None, data.compression, parts_dir, facts_view)
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


def one_class_message(plan: SourcePlan, config: Config, name: str) -> str:
    """Why a source whose labels hold one class is refused (a classifier needs two)."""
    where = (f"data.label_column: column {config.data.label_column!r} of {plan.uri}" if plan.modality == "text"
             else f"data.source: {plan.uri}")
    limit = f" (data.limit={config.data.limit} read only the first inputs)" if config.data.limit else ""
    return f"{where} holds one class, {name!r}{limit}; a classifier needs at least 2 classes"


def plan_lines(plan: SourcePlan) -> list[str]:
    """What run_preprocess prints once the source is planned: the plan, then for a folder the files
    skipped (not images by their extension) and a warning for images that train but cannot be
    served as files (.webp, .tif, .tiff: the export's image_bytes input decodes PNG, JPEG, GIF, BMP)."""
    language = plan.modality == "language"
    shape = "x".join(map(str, plan.input_spec.shape)) or "string"
    exact = plan.kind not in ("csv", "jsonl")
    classes = "no classes" if language else \
        f"{len(plan.class_names)} class{'es' * (len(plan.class_names) != 1)}" if plan.class_names else \
        "classes from the data"
    splits_from = "by key hash" if plan.has_splits is False else "from the source" if plan.has_splits else \
        "from the data"
    lines = [f"plan: {'' if exact else 'about '}{plan.estimated_count} inputs in {len(plan.tasks)} read "
             f"task{'' if len(plan.tasks) == 1 else 's'}, "
             f"{classes}, {plan.modality} {shape}, splits {splits_from}"]
    if skipped := skipped_line(plan):
        lines.append(skipped)
    if unserved := unserved_line(plan):
        lines.append(unserved)
    lines += folder_warning_lines(plan)
    return lines


def pipeline_options(plan: SourcePlan, beam_args) -> PipelineOptions:
    """The runner options: the user's, with the local default chosen by the planned input count."""
    return PipelineOptions(local_runner_defaults(list(beam_args), plan.estimated_count))


def run_preprocess(config: Config, run_dir: str, beam_args: list[str] = (), report=None,
                   planned=None) -> contract_lib.DataContract:
    """Runs the Beam pipeline and writes `RUN/data/metadata.json` last. Returns the contract.

    The job writes into a staging folder under RUN/data, published over the run's earlier data
    only once it has succeeded: a source that cannot be read, or turns out to hold too many bad
    inputs or one class, leaves the earlier data (and config.yaml) as they were, and its dead
    letters in the staging folder the error names. `planned()` is called once the new data are
    in place, before the contract is written (kcp.api records RUN/config.yaml there).

    `report(line)` receives a line per stage (and `plan_lines`' warnings, and one when the validation
    split came out empty, `summary.empty_validation_warning`). Fails (UserError) without writing the contract
    when more than `data.max_bad_fraction` of the inputs could not be read. A language source
    (text:PATH, python-stdlib) runs pipeline/language.py's graph instead: no labels, no
    augmentation, documents packed into token blocks.
    """
    report = report or (lambda line: log.info("%s", line))
    plan = plan_source(config.data.source, config.data)
    if MODEL_FAMILIES:  # registered by whoever loaded the config (the CLI, the API): --model gpt on digits is
        check_family_takes(config.model.name, plan.modality)  # refused here, not after the whole pipeline
    options = pipeline_options(plan, beam_args)
    run_dir = for_cluster_workers(run_dir, options)
    pipeline = checked_pipeline(options, [run_dir, source_path(plan.uri)])  # a bad option: one line, nothing touched
    language = plan.modality == "language"
    for line in plan_lines(plan):
        report(line)
    final_dir = contract_lib.data_dir(run_dir)
    storage.makedirs(final_dir)
    clear_leftovers(final_dir)
    # The job writes into a staging folder; the run's earlier data stay whole until it has succeeded
    # (a source that turns out to hold one class, or too many bad inputs, loses nothing).
    data_dir = storage.join(final_dir, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    storage.makedirs(data_dir)
    summary_path = storage.join(data_dir, f"{SUMMARY_PREFIX}{uuid.uuid4().hex[:8]}.json")
    all_options = options.get_all_options()
    mode = f" ({all_options.get('direct_running_mode')})" if all_options["runner"] == "FnApiRunner" else ""
    steps = "Read > Decode > Split > Tokenize > Pack > Write" if language else \
        f"Read > Decode > Split > Analyze > {'Augment > ' if config.data.augment.copies else ''}Encode > Write"
    report(f"beam: {all_options['runner']}{mode} running {steps}")
    parts_dir = storage.join(data_dir, f"{PARTS_PREFIX}{uuid.uuid4().hex[:8]}")
    if drops_finish_bundle_outputs(all_options["runner"]):
        parts_dir = None  # the shard writer groups the records themselves there
    progress_dir = progress_directory(all_options)
    try:
        with ProgressReporter(progress_dir, plan.estimated_count, report), pipeline:
            build = build_language_pipeline if language else build_pipeline
            build(pipeline, plan, config, data_dir, summary_path, parts_dir, progress_dir)
    finally:
        if parts_dir:
            storage.remove_tree(parts_dir)
    summary = json.loads(storage.read_text(summary_path))
    storage.remove(summary_path)
    # a failed job's dead letters: in RUN/data/dead_letter, unless that belongs to earlier data still there
    earlier = storage.exists(storage.join(final_dir, contract_lib.METADATA_FILE))
    try:
        contract, vocabulary = checked_contract(plan, config, summary, data_dir,
                                                storage.join(data_dir if earlier else final_dir, DEAD_LETTER_DIR))
    except Exception:
        discard(data_dir, final_dir, earlier)
        raise
    publish(data_dir, final_dir)
    if planned:  # RUN/config.yaml now says what RUN/data holds (before the contract, written last)
        planned()
    if not language and contract.splits["train"].count:
        write_samples(contract, run_dir)
    contract_lib.write_contract(run_dir, contract, vocabulary)
    bad, read = summary["dead_letters"], summary["read"]
    for line in counts_table(contract, read, bad, summary["augmented"]):
        report(line)
    for warning in (sparse_classes_warning(contract) or untrained_classes_warning(contract),
                    lookalike_classes_warning(contract), imbalanced_classes_warning(contract),
                    empty_validation_warning(contract, config)):
        if warning:
            report(warning)
    return contract


def checked_contract(plan: SourcePlan, config: Config, summary: dict, data_dir: str, dead_letters: str):
    """(contract, vocabulary) of what the job wrote to `data_dir`, or the one-line error that says
    why it is no data to train on: no inputs, too many bad ones (their reasons in `dead_letters`),
    no labels or one class."""
    language = plan.modality == "language"
    bad, read = summary["dead_letters"], summary["read"]
    if not read:
        raise SourceError(f"data.source: {plan.uri} holds no inputs")
    if bad / read > config.data.max_bad_fraction:  # first: what is left may look like one class, or none
        raise UserError(f"data.max_bad_fraction: {bad} of {read} inputs ({bad / read:.1%}) could not be read, above "
                        f"{config.data.max_bad_fraction:.1%}; reasons in {dead_letters}")
    if not language and not summary["facts"]["class_names"]:
        raise SourceError(f"data.label_column: column {config.data.label_column!r} of {plan.uri} is empty"
                          if plan.modality == "text" else f"data.source: {plan.uri} has no labels")
    if not language and len(summary["facts"]["class_names"]) == 1:
        raise SourceError(one_class_message(plan, config, summary["facts"]["class_names"][0]))
    if language:
        return language_contract(plan, config, summary, data_dir)
    if plan.modality == "text" and not summary.get("vocabulary"):  # every token rarer than min_count: no model
        raise UserError(f"data.min_count: no token occurs {config.data.min_count} times in the train split of "
                        f"{plan.uri}, so the vocabulary is empty (unique codes or ids, or a small set); set "
                        "data.min_count=1 to keep every token")
    return contract_from_summary(plan, config, summary, data_dir)
