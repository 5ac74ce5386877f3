"""Export the trained model as a SavedModel in TF Serving layout: RUN/export/NAME/VERSION/.

    python -m deploy.export --run-dir runs/r1

The serving signature takes raw inputs (uint8 images as the pipeline stored them) and
returns `class_ids`, `class_names` and `probabilities`; the normalisation with the
pipeline's statistics is inside the model, so serving cannot skew from training.
"""

from __future__ import annotations

import logging
import os
import uuid

from kcp import storage
from kcp.config import Config
from kcp.errors import UserError
from pipeline import contract as contract_lib

log = logging.getLogger("kcp.export")


def next_version(export_root: str) -> int:
    """One more than the highest integer version directory under `export_root` (1 if none)."""
    versions = [int(name.rstrip("/")) for name in storage.list_dir(export_root) if name.rstrip("/").isdigit()]
    return max(versions, default=0) + 1


def serving_functions(model, contract, vectorizer=None):
    """The tf.functions exported as signatures, keyed by signature name.

    Text signatures take raw strings and tokenise them in the graph with `vectorizer`.
    """
    import tensorflow as tf

    class_names = tf.constant(list(contract.class_names))
    text = contract.modality == "text"
    dtype = tf.string if text else tf.dtypes.as_dtype(contract.input_spec.dtype)

    def predict(inputs):
        model_inputs = tf.cast(vectorizer(inputs), tf.int32) if text else tf.cast(inputs, tf.float32)
        probabilities = model(model_inputs, training=False)
        class_ids = tf.argmax(probabilities, axis=-1)
        return {
            "class_ids": class_ids,
            "class_names": tf.gather(class_names, class_ids),
            "probabilities": probabilities,
        }

    serve_raw = tf.function(
        predict, input_signature=[tf.TensorSpec([None, *contract.input_shape], dtype, name=contract.input_feature)])
    return {"serving_default": serve_raw}


def export_for_serving(config: Config, run_dir: str) -> str:
    """Exports RUN/train/model.keras; returns the new version's directory."""
    import keras

    import trainer.models.layers  # noqa: F401  registers the zoo's custom layers for loading

    contract = contract_lib.read_contract(run_dir)
    model_path = storage.join(run_dir, "train", "model.keras")
    if not storage.exists(model_path):
        raise UserError(f"{model_path}: not found; run `kcp train --run-dir {run_dir}` first")
    model = keras.saving.load_model(model_path)
    export_root = storage.join(run_dir, "export", config.export.name)
    storage.makedirs(export_root)
    version = next_version(export_root)
    final = storage.join(export_root, str(version))
    # TF Serving only loads integer directories, so it never sees the temporary one.
    temporary = storage.join(export_root, f".tmp-{uuid.uuid4().hex[:8]}")
    archive = keras.export.ExportArchive()
    archive.track(model)
    vectorizer = None
    if contract.modality == "text":
        vectorizer = contract_lib.text_vectorizer(contract, run_dir)
        vectorizer(["build"])  # ExportArchive only tracks built layers
        archive.track(vectorizer)  # its lookup table goes into the SavedModel
    for name, function in serving_functions(model, contract, vectorizer).items():
        archive.add_endpoint(name, function)
    archive.write_out(temporary, verbose=False)
    if storage.is_remote(final):
        _copy_tree(temporary, final)
        storage.remove_tree(temporary)
    else:
        os.rename(temporary, final)
    log.info("export: wrote %s", final)
    return final


def _copy_tree(source: str, target: str) -> None:
    import tensorflow as tf

    for directory, _, files in tf.io.gfile.walk(source):
        relative = directory[len(source):].lstrip("/")
        tf.io.gfile.makedirs(storage.join(target, relative) if relative else target)
        for name in files:
            tf.io.gfile.copy(storage.join(directory, name), storage.join(target, relative, name), overwrite=True)


def main(argv: list[str] | None = None) -> int:
    from kcp import cli

    return cli.main(["export", *(argv if argv is not None else cli.sys_argv())], lenient=True)


if __name__ == "__main__":
    raise SystemExit(main())
