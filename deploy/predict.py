"""Batch prediction: a Beam pipeline over the exported SavedModel.

    kcp predict --run-dir runs/digits --input folder:/data/new_images --output preds/p

Reads the same source kinds as preprocessing, through the same planned read (the driver
plans, the workers read: `kcp.core.beamio.ReadSource`) but without labels (a table without its
label column, an npz of `x` alone, a folder of images without class folders), and writes one
JSON line per input,
{"key", "class_id", "class_name", "probability"}, to sharded files
`PREFIX-00000-of-000NN.jsonl` (`--output PREFIX`; a trailing `.jsonl` is dropped from the
prefix), or to exactly `--output` with `--single-file`. An input that cannot be read or
decoded, or whose prediction fails, goes to `PREFIX.dead_letter-*.jsonl` (key, source,
reason) and the job goes on. Image files go through the model's own `serving_default` (the
bytes are decoded in the graph, as the REST server does) after Pillow has checked that they
decode; in-memory images through `serve_images`, text and sequences through
`serving_default`. Inputs are batched (`beam.BatchElements`); a batch whose call fails is
retried one input at a time, so only the failing inputs become dead letters. Arrays of another
shape than the model's are refused before the job starts; the job's counters give the closing
"predicted N, failed M" line. Beam's
TensorFlow model handlers load with `tf.keras.models.load_model` and reject Keras 3
SavedModels, so the model is loaded here with `tf.saved_model.load`. Runner options pass
through after `--`, as for `kcp preprocess` (the same local default, chosen by the planned
input count).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from deploy.predict_output import COUNTERS, counts_line, job_files, output_claimed, output_prefix
from deploy.push import read_validation
from kcp.core import storage
from kcp.core.beamio import (DEAD_LETTER, EXAMPLE, CountProgress, ProgressReporter, ReadSource, checked_pipeline,
                             dead_letter, for_cluster_workers, local_runner_defaults, progress_directory, select)
from kcp.core.contract import read_lines
from kcp.core.errors import UserError
from kcp.core.layout import RunLayout, check_unchanged_since_validation, is_blessed, newest_blessed
from kcp.core.sources import (BadInput, SourceError, SourcePlan, SourceRecord, check_image_bytes, decode_array,
                               plan_source, record_text, skipped_line, source_modality, source_path)
from kcp.core.sources.base import read_input_file

MAX_BATCH_SIZE = 64
log = logging.getLogger("kcp.predict")


class SavedModelHandler:
    """Loads an export with tf.saved_model.load and calls one of its signatures on a batch.

    TensorFlow is imported here, on the workers, not when the module is imported.
    """

    def __init__(self, export_dir: str, signature: str, input_name: str):
        self._export_dir, self._signature, self._input_name = export_dir, signature, input_name

    def load_model(self):
        from deploy.saved_model import load_export  # TensorFlow on the workers only

        return load_export(self._export_dir)

    def run_inference(self, batch: Sequence[Any], model) -> list[dict]:
        """One dict of outputs (name -> this input's row) per input of the batch."""
        import tensorflow as tf

        function = model.signatures[self._signature]
        if isinstance(batch[0], (bytes, str)):
            inputs = tf.constant(list(batch), dtype=tf.string)
        else:
            inputs = tf.constant(np.stack(batch))
        outputs = {name: value.numpy() for name, value in function(**{self._input_name: inputs}).items()}
        return [{name: value[i] for name, value in outputs.items()} for i in range(len(batch))]


def client_input(plan: SourcePlan, record: SourceRecord):
    """What a client would send for one record: file bytes, a uint8 array, a string or floats."""
    if record.problem:
        raise BadInput(record.problem)
    if plan.kind == "folder":
        content = read_input_file(record.payload)  # a broken link named as preprocess names it
        check_image_bytes(content)
        return content
    if plan.modality == "text":
        return record_text(plan, record)
    return decode_array(record.payload, plan.input_spec)


def keyed_input(record: SourceRecord, plan: SourcePlan):
    """(EXAMPLE, (key, client input)), or (DEAD_LETTER, json line) for an input that cannot be sent."""
    try:
        return EXAMPLE, (record.key, client_input(plan, record))
    except Exception as error:  # noqa: BLE001  BadInput, and whatever else one input can raise
        reason = str(error) if isinstance(error, BadInput) else f"unexpected {type(error).__name__}: {error}"
        Metrics.counter(COUNTERS, "failed").inc()
        return DEAD_LETTER, dead_letter(record.key, plan.uri, reason)


def signature_for(plan: SourcePlan) -> tuple[str, str]:
    """(signature, input name) of the export that takes this source's inputs."""
    if plan.kind == "folder":
        return "serving_default", "image_bytes"
    if plan.modality == "image":
        return "serve_images", "image"
    return "serving_default", plan.input_feature


def export_modality(export_dir: str) -> str:
    """The modality an export takes, from its serving_default signature's inputs (RUN/data may have been
    preprocessed again since): image_bytes, texts (language), another string (text) or numbers (sequence)."""
    import tensorflow as tf  # the driver reads only saved_model.pb

    from deploy.saved_model import signature_defs

    inputs = signature_defs(export_dir)["serving_default"].inputs
    if "image_bytes" in inputs:
        return "image"
    if "texts" in inputs:
        return "language"
    return "text" if any(spec.dtype == tf.string.as_datatype_enum for spec in inputs.values()) else "sequence"


def check_input_shape(export_dir: str, plan: SourcePlan) -> None:
    """A one-line UserError, before the job starts, when the export's saved_model.pb cannot be read,
    or the source's arrays are not the shape the model takes (a signature call would broadcast some
    of them into wrong predictions). Image files are resized in the graph, and text has no shape."""
    import tensorflow as tf  # the driver reads only saved_model.pb

    from deploy.saved_model import signature_defs

    signatures = signature_defs(export_dir)
    if plan.kind == "folder" or plan.modality == "text":
        return
    signature, input_name = signature_for(plan)
    model_shape = tf.TensorShape(signatures[signature].inputs[input_name].tensor_shape)
    if not model_shape.is_compatible_with([None, *plan.input_spec.shape]):
        raise UserError(f"--input: {plan.uri} holds inputs of shape {list(plan.input_spec.shape)}; the model "
                        f"takes {model_shape.as_list()[1:]} ({signature}'s input {input_name!r})")


def failure_reason(error: Exception) -> str:
    """A dead letter's reason for a failed prediction of one input: TensorFlow's cause line, as the
    server answers it, without the "instance 0: " a one-input call names."""
    from deploy.serving.codec import error_message  # TensorFlow: on the workers only

    message = error_message(error, 300)
    return f"prediction failed ({type(error).__name__}: {message.removeprefix('instance 0: ')})"


def export_class_names(export_dir: str) -> tuple:
    """The export's own class names (assets.extra/labels.txt), as `kcp serve` answers with: not the run's
    data contract, which a later `kcp preprocess` may have reordered or changed. () without the file."""
    path = storage.join(export_dir, "assets.extra", "labels.txt")
    return tuple(read_lines(storage.read_text(path))) if storage.exists(path) else ()


def to_json_line(key: str, probabilities, class_names: tuple) -> str:
    class_id = int(np.argmax(probabilities))
    name = class_names[class_id] if class_id < len(class_names) else str(class_id)  # no labels: the column
    return json.dumps({"key": key, "class_id": class_id, "class_name": name,
                       "probability": float(probabilities[class_id])}, sort_keys=True)


class PredictFn(beam.DoFn):
    """A batch of (key, input) -> tagged JSON lines: predictions, or dead letters for inputs
    whose prediction fails (the batch is retried one input at a time to find them)."""

    def __init__(self, export_dir: str, signature: str, input_name: str, class_names: tuple, source: str):
        self._handler = SavedModelHandler(export_dir, signature, input_name)
        self._class_names, self._source = class_names, source
        self._model = None

    def setup(self):
        self._model = self._handler.load_model()

    def _predict(self, items):
        results = self._handler.run_inference([value for _, value in items], self._model)
        lines = [(EXAMPLE, to_json_line(key, result["probabilities"], self._class_names))
                 for (key, _), result in zip(items, results)]
        Metrics.counter(COUNTERS, "predicted").inc(len(lines))
        return lines

    def process(self, batch):
        try:
            yield from self._predict(batch)
            return
        except Exception:  # noqa: BLE001  find the inputs that fail, one at a time
            pass
        for item in batch:
            try:
                yield from self._predict([item])
            except Exception as error:  # noqa: BLE001
                Metrics.counter(COUNTERS, "failed").inc()
                yield DEAD_LETTER, dead_letter(item[0], self._source, failure_reason(error))


def plan_input(input: str, data, modality: str) -> SourcePlan:  # noqa: A002
    """The plan of batch prediction's input (a source, as for preprocess, with no labels needed) for a
    model of `modality`; its errors name --input."""
    if not isinstance(input, str) or not input:
        raise UserError(f"--input: expected a source such as folder:PATH, csv:FILE or npz:FILE, got {input!r}")
    holds = source_modality(input)  # a table given to an image model: that error, not its missing text column
    if holds is None or holds == modality:
        try:
            plan = plan_source(input, data, labels=False)  # no labels needed: a bare table, npz x or image folder
        except SourceError as error:
            other = other_modality(input, data, modality)  # float series read as the image model's images
            if other:
                raise UserError(f"--input: {input} holds {other}, the model takes {modality}") from None
            message = str(error)
            raise SourceError("--input:" + message[len("data.source:"):] if message.startswith("data.source:")
                              else message) from None
        holds = plan.modality
    if holds != modality:
        raise UserError(f"--input: {input} holds {holds}, the model takes {modality}")
    return plan


def other_modality(input: str, data, modality: str) -> str | None:  # noqa: A002
    """What an npz holds when it is read without the model's modality imposed (api.predict imposes it,
    so that integer series reach a sequence model), where that is another modality; else None."""
    if data.modality != modality:
        return None
    try:
        held = plan_source(input, dataclasses.replace(data, modality=None), labels=False).modality
    except SourceError:
        return None
    return held if held != modality else None


def input_files(plan: SourcePlan) -> list[str]:
    """The files a table or npz source reads (a pattern's matches), which --output must not name."""
    path = source_path(plan.uri)
    if plan.kind == "folder" or not path:
        return []
    return storage.glob(path) if any(mark in path for mark in "*?[") else [path]


def prediction_version(layout: RunLayout, name: str, version: int | None, say) -> str:
    """The export version directory batch prediction runs: `version`, or else, as `kcp serve`
    answers, the newest version `kcp validate` blessed (the newest when none is); `say` is told
    when that is not the newest."""
    directory = layout.version_dir(name, version)
    newest = int(directory.rstrip("/").rsplit("/", 1)[-1])
    if version is None:
        blessed = newest_blessed(layout.export_root(name))
        if blessed is None:  # kcp serve would serve nothing: said, with why when validate refused it
            reasons = (read_validation(directory) or {}).get("reasons") or []
            why = f" ({'; '.join(reasons)})" if reasons else ""
            say(f"no version is blessed by `kcp validate`{why}; predicting with version {newest}, the newest, "
                "which `kcp serve` would not serve")
        elif blessed != newest:
            directory = layout.version_dir(name, blessed)
            say(f"version {newest} is not blessed by `kcp validate`; predicting with version {blessed}, the newest "
                f"blessed one (--version {newest} to use it)")
    elif not is_blessed(directory):
        say(f"version {version} is not blessed by `kcp validate`; predicting with it, as asked")
    return directory


def run_batch_prediction(export_dir: str, plan: SourcePlan, output: str, beam_args: list[str],
                         single_file: bool = False, report=None) -> list[str]:
    """Runs the job; returns the prediction files written (sorted), whose class names are the
    export's own (export_class_names). `report(line)` gets the progress lines of a local run."""
    check_unchanged_since_validation(export_dir, read_validation(export_dir))  # the workers load what was validated
    signature, input_name = signature_for(plan)
    check_input_shape(export_dir, plan)
    if skipped := skipped_line(plan):  # files below --input folder: that are not images, as preprocess says it
        (report or log.info)(skipped)
    options = PipelineOptions(local_runner_defaults(list(beam_args), plan.estimated_count))
    prefix = output_prefix(output)
    export_dir = for_cluster_workers(export_dir, options)
    pipeline = checked_pipeline(options, [prefix, export_dir, source_path(plan.uri)])  # before outputs are removed
    progress_dir = progress_directory(options.get_all_options())
    with output_claimed(output, prefix, single_file, input_files(plan)), \
            ProgressReporter(progress_dir, plan.estimated_count, report or (lambda line: None)), pipeline:
        records = pipeline | "Read" >> ReadSource(plan)
        if progress_dir:
            records = records | "Progress" >> beam.ParDo(CountProgress(progress_dir))
        inputs = records | "ClientInputs" >> beam.Map(keyed_input, plan)
        predicted = (
            select(inputs, EXAMPLE, "Inputs")
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=MAX_BATCH_SIZE)
            | "Predict" >> beam.ParDo(PredictFn(export_dir, signature, input_name, export_class_names(export_dir),
                                                plan.uri))
        )
        lines = select(predicted, EXAMPLE, "Predictions")
        dead = (select(inputs, DEAD_LETTER, "Unreadable"), select(predicted, DEAD_LETTER, "Failed")) \
            | "MergeDeadLetters" >> beam.Flatten()
        if single_file:
            _ = lines | "Write" >> beam.io.WriteToText(output, shard_name_template="", num_shards=1)
            _ = dead | "WriteDeadLetters" >> beam.io.WriteToText(
                prefix + ".dead_letter.jsonl", shard_name_template="", num_shards=1, skip_if_empty=True)
        else:
            _ = lines | "Write" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl")
            _ = dead | "WriteDeadLetters" >> beam.io.WriteToText(
                prefix + ".dead_letter", file_name_suffix=".jsonl", skip_if_empty=True)
    dead_letters = f"{prefix}.dead_letter.jsonl" if single_file else f"{prefix}.dead_letter-*-of-*.jsonl"
    (report or log.info)(counts_line(pipeline.result, dead_letters))
    if single_file:
        return [output]
    return job_files(prefix)
