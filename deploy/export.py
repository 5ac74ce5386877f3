"""Export the trained model as a SavedModel in TF Serving layout: RUN/export/NAME/VERSION/.

    python -m deploy.task --run-dir runs/r1

The serving signatures take the raw inputs a client has (encoded image files, strings,
float arrays) and return `class_ids`, `class_names` and `probabilities`; decoding,
tokenisation and the normalisation with the pipeline's statistics are inside the graph, so
serving cannot skew from training. assets.extra/ holds labels.txt and TF Serving warmup
requests built from real test examples (tensorflow-serving-api's PredictionLog protos).
"""

from __future__ import annotations

import logging
import os
import uuid

import keras
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

import trainer.models.layers  # noqa: F401  registers the zoo's custom layers, which model.keras may hold
from kcp.core import storage
from kcp.core.config import Config
from kcp.core.errors import UserError
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core.layout import RunLayout

log = logging.getLogger("kcp.export")
WARMUP_REQUESTS = 100  # TF Serving replays these at load; it accepts at most 1,000


def client_inputs(contract, inputs) -> list | object:
    """What a client would send for a batch of stored inputs: PNG bytes for images (lossless),
    the strings for text, the floats for sequences."""
    if contract.modality == "image":
        return [tf.io.encode_png(image).numpy() for image in inputs]
    return inputs


def serving_functions(model, contract, vectorizer=None):
    """The tf.functions exported as signatures, keyed by signature name.

    image:    serving_default(image_bytes: string [N]) PNG/JPEG/BMP/GIF of any size, decoded
              and resized in the graph; serve_images(image: uint8 [N, H, W, C])
    sequence: serving_default(sequence: float32 [N, T, F])
    text:     serving_default(text: string [N]), tokenised with the run's vocabulary
    all:      serve_examples(examples: string [N]) serialized tf.train.Example (TFX convention)
    Outputs: class_ids, class_names, probabilities.
    """
    class_names = tf.constant(list(contract.class_names))
    modality = contract.modality

    def predict(stored_inputs):
        """From inputs as the contract stores them (uint8 images, floats, strings)."""
        if modality == "text":
            model_inputs = tf.cast(vectorizer(stored_inputs), tf.int32)
        else:
            model_inputs = tf.cast(stored_inputs, tf.float32)
        probabilities = model(model_inputs, training=False)
        class_ids = tf.argmax(probabilities, axis=-1)
        return {
            "class_ids": class_ids,
            "class_names": tf.gather(class_names, class_ids),
            "probabilities": probabilities,
        }

    def from_examples(examples):
        inputs, _, _ = example_lib.parse_examples(contract, examples)
        return predict(inputs)

    functions = {"serve_examples": tf.function(
        from_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])}
    if modality == "image":
        height, width, channels = contract.input_shape

        def decode(encoded):
            image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
            resized = tf.image.resize(image, [height, width], method="bilinear")
            return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

        def from_bytes(image_bytes):
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([height, width, channels],
                                                                                      tf.uint8))
            return predict(images)

        functions["serving_default"] = tf.function(
            from_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        functions["serve_images"] = tf.function(
            predict, input_signature=[tf.TensorSpec([None, height, width, channels], tf.uint8, name="image")])
    elif modality == "text":
        functions["serving_default"] = tf.function(
            predict, input_signature=[tf.TensorSpec([None], tf.string, name=contract.input_feature)])
    else:
        functions["serving_default"] = tf.function(
            predict, input_signature=[tf.TensorSpec([None, *contract.input_shape], tf.float32,
                                                    name=contract.input_feature)])
    return functions


def serving_input_name(contract) -> str:
    return "image_bytes" if contract.modality == "image" else contract.input_feature


def write_warmup_requests(path: str, contract, run_dir: str, name: str, count: int) -> int:
    """assets.extra/tf_serving_warmup_requests: PredictionLog records of real test inputs."""
    split = "test" if contract.splits.get("test") and contract.splits["test"].count else "train"
    written = 0
    with tf.io.TFRecordWriter(path) as writer:
        for inputs, _, _ in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split, 1):
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
                name=name, signature_name="serving_default"))
            request.inputs[serving_input_name(contract)].CopyFrom(
                tf.make_tensor_proto(client_inputs(contract, inputs.numpy())))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            written += 1
            if written >= count:
                break
    return written


def export_for_serving(config: Config, run_dir: str) -> str:
    """Exports RUN/train/model.keras; returns the new version's directory."""
    layout = RunLayout(run_dir)
    contract = contract_lib.read_contract(run_dir)
    model_path = layout.model
    if not storage.exists(model_path):
        raise UserError(f"{model_path}: not found; run `kcp train --run-dir {run_dir}` first")
    model = keras.saving.load_model(model_path)
    export_root = layout.export_root(config.export.name)
    storage.makedirs(export_root)
    version = layout.next_version(config.export.name)
    final = storage.join(export_root, str(version))
    # TF Serving only loads integer directories, so it never sees the temporary one.
    temporary = storage.join(export_root, f".tmp-{uuid.uuid4().hex[:8]}")
    archive = keras.export.ExportArchive()
    archive.track(model)
    vectorizer = None
    if contract.modality == "text":
        vectorizer = example_lib.text_vectorizer(contract, run_dir)
        vectorizer(["build"])  # ExportArchive only tracks built layers
        archive.track(vectorizer)  # its lookup table goes into the SavedModel
    for name, function in serving_functions(model, contract, vectorizer).items():
        archive.add_endpoint(name, function)
    archive.write_out(temporary, verbose=False)
    extra = storage.join(temporary, "assets.extra")
    storage.makedirs(extra)
    storage.write_text_atomic(storage.join(extra, "labels.txt"), "".join(f"{n}\n" for n in contract.class_names))
    write_warmup_requests(storage.join(extra, "tf_serving_warmup_requests"), contract, run_dir,
                          config.export.name, WARMUP_REQUESTS)
    if storage.is_remote(final):
        _copy_tree(temporary, final)
        storage.remove_tree(temporary)
    else:
        os.rename(temporary, final)
    log.info("export: wrote %s", final)
    return final


def _copy_tree(source: str, target: str) -> None:
    for directory, _, files in tf.io.gfile.walk(source):
        relative = directory[len(source):].lstrip("/")
        tf.io.gfile.makedirs(storage.join(target, relative) if relative else target)
        for name in files:
            tf.io.gfile.copy(storage.join(directory, name), storage.join(target, relative, name), overwrite=True)
