"""Export the trained model as a SavedModel in TF Serving layout: RUN/export/NAME/VERSION/.

    python -m deploy.task --run-dir runs/r1

The serving signatures take the raw inputs a client has (encoded image files, strings,
float arrays) and return `class_ids`, `class_names` and `probabilities`; decoding,
tokenisation and the normalisation with the pipeline's statistics are inside the graph, so
serving cannot skew from training. A language model (gpt) gets `generate` (prompts -> completions,
the whole sampling loop in the graph) and `score` (texts -> log-probabilities), the default. assets.extra/ holds labels.txt and TF Serving warmup
requests built from real test examples (tensorflow-serving-api's PredictionLog protos):
`export.warmup_requests` of them (default 100, TF Serving accepts at most 1,000; 0 writes none).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

import trainer.models.layers  # noqa: F401  registers the zoo's custom layers, which model.keras may hold
from kcp.core import storage
from kcp.core.config import Config
from kcp.core.errors import UserError
from kcp.core import contract as contract_lib
from kcp.core import document_cache
from kcp.core import examples as example_lib
from kcp.core.layout import FINGERPRINT, RunLayout
from deploy.images import decode_like_pipeline
from deploy.language import GENERATE_SPECS, language_codec, language_functions, language_texts

log = logging.getLogger("kcp.export")


def client_inputs(contract, inputs) -> list | object:
    """What a client would send for a batch of stored inputs: PNG bytes for images (lossless),
    the strings for text, the floats for sequences."""
    if contract.modality == "image":
        return [tf.io.encode_png(image).numpy() for image in inputs]
    return inputs


def serving_functions(model, contract, vectorizer=None):
    """The tf.functions exported as signatures, keyed by signature name.

    image:    serving_default(image_bytes: string [N]) PNG/JPEG/BMP/GIF of any size, decoded,
              converted and resized in the graph as the pipeline's Pillow does (deploy/images.py);
              serve_images(image: uint8 [N, H, W, C])
    sequence: serving_default(sequence: float32 [N, T, F])
    text:     serving_default(text: string [N]), tokenised with the run's vocabulary (and its character
              n-grams hashed, data.char_ngrams)
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
        inputs, _, _ = example_lib.parse_examples(contract, examples, labelled=False)  # new data: no key, no label
        return predict(inputs)

    functions = {"serve_examples": tf.function(
        from_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")])}
    if modality == "image":
        height, width, channels = contract.input_shape

        def from_bytes(image_bytes):
            indices = tf.range(tf.shape(image_bytes)[0])  # named in the error for bytes that are no image
            images = tf.map_fn(lambda pair: decode_like_pipeline(pair[1], height, width, channels, pair[0]),
                               (indices, image_bytes),
                               fn_output_signature=tf.TensorSpec([height, width, channels], tf.uint8))
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
    if contract.modality == "language":
        return "texts"
    return "image_bytes" if contract.modality == "image" else contract.input_feature


def _prediction_log(name: str, signature: str, inputs: dict) -> bytes:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return log.SerializeToString()


def write_warmup_requests(path: str, contract, run_dir: str, name: str, count: int) -> int:
    """assets.extra/tf_serving_warmup_requests: PredictionLog records of real test inputs (language:
    `score` on test texts, and one short `generate`)."""
    split = "test" if contract.splits.get("test") and contract.splits["test"].count else "train"
    written = 0
    with tf.io.TFRecordWriter(path) as writer:
        if contract.modality == "language":
            texts = language_texts(contract, run_dir, split, count=max(1, count - 1))
            if texts:
                writer.write(_prediction_log(name, "generate", {
                    "prompts": np.array([texts[0][:32].encode("utf-8")], dtype=object),
                    **{key: np.array(value, dtype=GENERATE_SPECS[key].dtype.as_numpy_dtype)
                       for key, value in {**contract_lib.GENERATE_DEFAULTS, "max_new_tokens": 4}.items()}}))
                written += 1
            for text in texts:
                writer.write(_prediction_log(name, "serving_default", {"texts": np.array([text.encode("utf-8")],
                                                                                        dtype=object)}))
                written += 1
            return written
        for inputs, _, _ in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split, 1):
            writer.write(_prediction_log(name, "serving_default",
                                         {serving_input_name(contract): client_inputs(contract, inputs.numpy())}))
            written += 1
            if written >= count:
                break
    return written


def export_for_serving(config: Config, run_dir: str, generate_tokens=None) -> str:
    """Exports RUN/train/model.keras; returns the new version's directory. A language model needs
    `generate_tokens` (trainer/generate.py's, passed in by the front: deploy imports no trainer code).

    The SavedModel is written to a temporary folder and published as the next version number,
    claimed atomically, so two concurrent exports never get the same version and no reader ever
    sees a partial one: locally one os.rename of the whole folder, which fails when the version
    exists (the next number is tried); on gs:// an object RUN/export/NAME/.claims/VERSION
    created with `ifGenerationMatch=0` claims the number, then the files are copied with
    saved_model.pb last (TF Serving, `kcp validate` and `kcp push` take a version only once
    saved_model.pb is there).
    """
    layout = RunLayout(run_dir)
    contract = contract_lib.read_contract(run_dir)
    model_path = layout.model
    _check_finished(layout, run_dir)
    fingerprint = contract_lib.check_trained_on_contract(layout, run_dir)
    if contract.modality == "language" and generate_tokens is None:
        raise UserError("export: a language model's export needs the gpt sampler; export it with `kcp export` "
                        "or kcp.api.export")
    model = keras.saving.load_model(model_path, compile=False)  # serving needs no loss, metrics or optimizer
    fingerprint["weights_sha256"] = weights_sha256(model)
    cache_weights = document_cache.NO_CACHE
    if contract.modality == "language":  # what the score signature mixes in, recorded beside it
        cache_weights = trained_cache_weights(layout)
        fingerprint["document_cache_weights"] = list(cache_weights)
    export_root = layout.export_root(config.export.name)
    storage.makedirs(export_root)
    remote = storage.is_remote(export_root)
    # TF Serving only loads integer directories, so it never sees the temporary one; for gs://
    # the SavedModel is made on local disk and uploaded in the order that keeps it unloadable until whole.
    temporary = tempfile.mkdtemp(prefix="kcp-export-") if remote \
        else storage.join(export_root, f".tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_savedmodel(model, contract, config, run_dir, temporary, generate_tokens, cache_weights)
        storage.write_text_atomic(storage.join(temporary, "assets.extra", FINGERPRINT),
                                  json.dumps(fingerprint, indent=2) + "\n")
        final = _publish_remote(layout, config.export.name, temporary) if remote \
            else _publish_local(layout, config.export.name, temporary)
    finally:
        if remote or os.path.exists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
    log.info("export: wrote %s", final)
    return final


def weights_sha256(model) -> str:
    """SHA-256 of every weight's bytes, in order: the trainer's metrics.json `weights_sha256`."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()


def trained_cache_weights(layout: RunLayout) -> tuple:
    """The document-cache weights the trainer fitted (metrics.json), or none for a run without them."""
    metrics = json.loads(storage.read_text(layout.metrics)) if storage.exists(layout.metrics) else {}
    return document_cache.trained_weights(metrics)


def _check_finished(layout: RunLayout, run_dir: str) -> None:
    """Refuses a RUN/train/ whose last training did not finish. The trainer removes the previous
    model.keras and metrics.json before it fits and writes metrics.json last, so a finished model
    is model.keras with metrics.json beside it; a training killed after its first epoch leaves
    neither (beside its history.json), or, killed inside the save, model.keras alone."""
    model, metrics = storage.exists(layout.model), storage.exists(layout.metrics)
    if model and metrics:
        return
    if not model and not storage.exists(layout.history):  # no training ever got past its first epoch
        raise UserError(f"{layout.model}: not found; run `kcp train --run-dir {run_dir}` first")
    raise UserError(f"{layout.train} holds no finished model: the last kcp train did not finish (killed, or "
                    f"stopped by an error such as a NaN loss); rerun it (`kcp train --run-dir {run_dir}`: a killed "
                    "one resumes from its last epoch with the settings it had)")


def _write_savedmodel(model, contract, config: Config, run_dir: str, directory: str, generate_tokens=None,
                      cache_weights=document_cache.NO_CACHE) -> None:
    archive = keras.export.ExportArchive()
    archive.track(model)
    vectorizer = None
    if contract.modality == "text":
        vectorizer = example_lib.text_vectorizer(contract, run_dir)
        vectorizer(["build"])  # ExportArchive only tracks built layers
        archive.track(vectorizer)  # its lookup table goes into the SavedModel
    if contract.modality == "language":
        encoder, decoder = language_codec(contract, run_dir)
        for part in (encoder, decoder):
            if isinstance(part, tf.__internal__.tracking.Trackable):
                archive.track(part)  # their lookup tables (characters) go into the SavedModel
        functions = language_functions(model, contract, encoder, decoder, generate_tokens, cache_weights=cache_weights)
    else:
        functions = serving_functions(model, contract, vectorizer)
    for name, function in functions.items():
        archive.add_endpoint(name, function)
    archive.write_out(directory, verbose=False)
    extra = storage.join(directory, "assets.extra")
    storage.makedirs(extra)
    storage.write_text_atomic(storage.join(extra, "labels.txt"), contract_lib.lines_text(contract.class_names))
    if config.export.warmup_requests:
        write_warmup_requests(storage.join(extra, "tf_serving_warmup_requests"), contract, run_dir,
                              config.export.name, config.export.warmup_requests)


def _publish_local(layout: RunLayout, name: str, temporary: str) -> str:
    """Renames the whole folder to the next free version: os.rename fails (EEXIST/ENOTEMPTY)
    when another export took that number first, and the next number is tried."""
    for _ in range(1000):
        final = storage.join(layout.export_root(name), str(layout.next_version(name)))
        try:
            storage.fault_point("before", final)
            os.rename(temporary, final)
            storage.fault_point("after", final)
            return final
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise UserError(f"{layout.export_root(name)}: could not claim a version number")


def _publish_remote(layout: RunLayout, name: str, local_dir: str) -> str:
    claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
    for _ in range(1000):
        version = layout.next_version(name)
        if storage.create_exclusive(storage.join(layout.version_claims(name), str(version)), claim):
            break
    else:
        raise UserError(f"{layout.export_root(name)}: could not claim a version number")
    final = storage.join(layout.export_root(name), str(version))
    copy_tree(local_dir, final)
    return final


def copy_tree(source: str, target: str) -> None:
    """Copies an export folder (local or any URI tf.io.gfile takes) to `target`, saved_model.pb last,
    so that a reader that waits for saved_model.pb (TF Serving, Vertex AI) never takes a partial copy."""
    files = []
    root = source.rstrip("/")
    for directory, _, names in tf.io.gfile.walk(root):
        relative_dir = directory[len(root):].strip("/").replace(os.sep, "/")
        files += [f"{relative_dir}/{name}" if relative_dir else name for name in names]
    files.sort(key=lambda relative: (relative == "saved_model.pb", relative))
    for relative in files:
        destination = storage.join(target, *relative.split("/"))
        tf.io.gfile.makedirs(destination.rsplit("/", 1)[0])
        storage.fault_point("before", destination)
        tf.io.gfile.copy(storage.join(root, *relative.split("/")), destination, overwrite=True)
