"""Validation before push: run a split through the export's serving signature from raw inputs.

    kcp validate --run-dir runs/digits [--version N]

The test split goes in as a client would send it (PNG bytes for images, strings for text,
floats for sequences); the export's accuracy must match the trainer's test accuracy within
0.5 percentage points and reach `export.min_accuracy` when set. The figures and the verdict
go to RUN/export/NAME/VERSION/assets.extra/validation.json, which travels with the model.
"""

from __future__ import annotations

import json
import os

import numpy as np

import tensorflow as tf

from deploy.export import FINGERPRINT, client_inputs, serving_input_name
from kcp.core import storage
from kcp.core.config import Config
from kcp.core.errors import UserError
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core.layout import RunLayout

MAX_DIFFERENCE = 0.005


def predict_split(export_dir: str, run_dir: str, split: str = "test", batch_size: int = 256) -> dict:
    """Loads the SavedModel with `tf.saved_model.load` and predicts a split from client inputs.

    Returns {"keys", "labels", "class_ids", "probabilities"} as NumPy arrays in shard order.
    """
    contract = contract_lib.read_contract(run_dir)
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    name = serving_input_name(contract)
    keys, labels, class_ids, probabilities = [], [], [], []
    for inputs, batch_labels, batch_keys in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split,
                                                                     batch_size):
        raw = client_inputs(contract, inputs.numpy())
        outputs = serve(**{name: tf.constant(raw)})
        keys.append(batch_keys.numpy())
        labels.append(batch_labels.numpy())
        class_ids.append(outputs["class_ids"].numpy())
        probabilities.append(outputs["probabilities"].numpy())
    return {
        "keys": np.concatenate(keys),
        "labels": np.concatenate(labels),
        "class_ids": np.concatenate(class_ids),
        "probabilities": np.concatenate(probabilities),
    }


def export_accuracy(export_dir: str, run_dir: str, split: str = "test") -> float:
    """Accuracy of the reloaded export on a split, fed the raw inputs a client would send."""
    predictions = predict_split(export_dir, run_dir, split)
    return float(np.mean(predictions["class_ids"] == predictions["labels"]))


def validate_export(config: Config, run_dir: str, version: int | None = None) -> dict:
    """Validates one export version; writes and returns its validation.json content."""
    layout = RunLayout(run_dir)
    directory = layout.version_dir(config.export.name, version)
    metrics_path = layout.metrics
    if not storage.exists(metrics_path):
        raise UserError(f"{metrics_path}: not found; validation compares with the trainer's test metrics")
    metrics = json.loads(storage.read_text(metrics_path))
    test = contract_lib.read_contract(run_dir).splits.get("test")
    if not test or not test.count or "test" not in metrics:
        raise UserError(f"{run_dir}: the test split is empty, so there is nothing to validate the export on; "
                        "give data.split a test fraction (or the source a test split) and preprocess again")
    fingerprint_path = storage.join(directory, "assets.extra", FINGERPRINT)
    # read with TensorFlow's file system, like the rest of the export (on gs://, TensorFlow's client wrote it)
    if metrics.get("weights_sha256") and tf.io.gfile.exists(fingerprint_path):
        with tf.io.gfile.GFile(fingerprint_path, "rb") as handle:
            exported = json.loads(handle.read()).get("weights_sha256")
        if exported and exported != metrics["weights_sha256"]:
            raise UserError(f"{directory} was exported from another model than {metrics_path} describes "
                            f"(trained again since); run `kcp export --run-dir {run_dir}` and validate the new version")
    trainer = metrics["test"]["accuracy"]
    accuracy = export_accuracy(directory, run_dir, "test")
    reasons = []
    if abs(accuracy - trainer) > MAX_DIFFERENCE:
        reasons.append(f"export accuracy {accuracy:.4f} differs from the trainer's {trainer:.4f} by more than "
                       f"{MAX_DIFFERENCE:.3f}")
    if config.export.min_accuracy is not None and accuracy < config.export.min_accuracy:
        reasons.append(f"export accuracy {accuracy:.4f} is below export.min_accuracy {config.export.min_accuracy}")
    result = {
        "version": int(directory.rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1]),
        "export_accuracy": accuracy,
        "trainer_accuracy": trainer,
        "difference": accuracy - trainer,
        "max_difference": MAX_DIFFERENCE,
        "min_accuracy": config.export.min_accuracy,
        "examples": test.count,
        "blessed": not reasons,
        "reasons": reasons,
    }
    storage.write_text_atomic(storage.join(directory, "assets.extra", "validation.json"),
                              json.dumps(result, indent=2) + "\n")
    return result
