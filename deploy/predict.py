"""Batch prediction: a Beam pipeline with RunInference over the exported SavedModel.

    kcp predict --run-dir runs/digits --input folder:/data/new_images --output predictions.jsonl

Reads the same source kinds as preprocessing and writes one JSON line per input:
{"key", "class_id", "class_name", "probability"}. Image files go through the model's own
`serving_default` (the bytes are decoded in the graph, as the REST server does); in-memory
images through `serve_images`, text and sequences through `serving_default`. Beam's
TensorFlow model handlers load with `tf.keras.models.load_model` and reject Keras 3
SavedModels, so a small handler here calls `tf.saved_model.load`. Runner options pass
through after `--`, as for `kcp preprocess`.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from kcp.core import storage
from kcp.core.beamio import DEAD_LETTER, EXAMPLE, dead_letter, local_runner_defaults, select
from kcp.core.sources import BadInput, SourcePlan, SourceRecord, decode_array, decode_text


class SavedModelHandler(ModelHandler[Any, PredictionResult, Any]):
    """Loads an export with tf.saved_model.load and calls one of its signatures on a batch."""

    def __init__(self, export_dir: str, signature: str, input_name: str, max_batch_size: int = 64):
        self._export_dir, self._signature, self._input_name = export_dir, signature, input_name
        self._max_batch_size = max_batch_size

    def load_model(self):
        return tf.saved_model.load(self._export_dir)

    def run_inference(self, batch: Sequence[Any], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        function = model.signatures[self._signature]
        if isinstance(batch[0], (bytes, str)):
            inputs = tf.constant(list(batch), dtype=tf.string)
        else:
            inputs = tf.constant(np.stack(batch))
        outputs = {name: value.numpy() for name, value in function(**{self._input_name: inputs}).items()}
        return [PredictionResult(example, {name: value[i] for name, value in outputs.items()})
                for i, example in enumerate(batch)]

    def batch_elements_kwargs(self):
        return {"max_batch_size": self._max_batch_size}


def client_input(plan: SourcePlan, record: SourceRecord):
    """What a client would send for one record: file bytes, a uint8 array, a string or floats."""
    if plan.kind == "folder":
        content = storage.read_bytes(record.payload)
        if not content:
            raise BadInput("empty file")
        return content
    if plan.modality == "text":
        return decode_text(record.payload)
    return decode_array(record.payload, plan.input_spec)


def signature_for(plan: SourcePlan) -> tuple[str, str]:
    """(signature, input name) of the export that takes this source's inputs."""
    if plan.kind == "folder":
        return "serving_default", "image_bytes"
    if plan.modality == "image":
        return "serve_images", "image"
    return "serving_default", plan.input_feature


def to_json_line(item, class_names: tuple) -> str:
    key, result = item
    probabilities = result.inference["probabilities"]
    class_id = int(np.argmax(probabilities))
    return json.dumps({"key": key, "class_id": class_id, "class_name": class_names[class_id],
                       "probability": float(probabilities[class_id])}, sort_keys=True)


def run_batch_prediction(export_dir: str, class_names: tuple, plan: SourcePlan, records: list, output: str,
                         beam_args: list[str]) -> None:
    signature, input_name = signature_for(plan)

    def to_keyed_input(record):
        try:
            return EXAMPLE, (record.key, client_input(plan, record))
        except BadInput as error:
            return DEAD_LETTER, dead_letter(record.key, plan.uri, str(error))

    handler = KeyedModelHandler(SavedModelHandler(export_dir, signature, input_name))
    with beam.Pipeline(options=PipelineOptions(local_runner_defaults(list(beam_args)))) as pipeline:
        inputs = pipeline | "Read" >> beam.Create(records) | "ClientInputs" >> beam.Map(to_keyed_input)
        _ = (
            select(inputs, EXAMPLE, "Inputs")
            | "RunInference" >> RunInference(handler)
            | "ToJson" >> beam.Map(to_json_line, class_names)
            | "Write" >> beam.io.WriteToText(output, shard_name_template="", num_shards=1)
        )
        _ = select(inputs, DEAD_LETTER, "Bad") | "WriteDeadLetters" >> beam.io.WriteToText(
            output + ".dead_letter", shard_name_template="", num_shards=1, skip_if_empty=True)
