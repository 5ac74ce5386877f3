"""Check an export against the data: run a split through its serving signature from raw inputs."""

from __future__ import annotations

import numpy as np

from pipeline import contract as contract_lib


def predict_split(export_dir: str, run_dir: str, split: str = "test", batch_size: int = 256) -> dict:
    """Loads the SavedModel with `tf.saved_model.load` and predicts a split from raw inputs.

    Returns {"keys", "labels", "class_ids", "probabilities"} as NumPy arrays in shard order.
    """
    import tensorflow as tf

    contract = contract_lib.read_contract(run_dir)
    loaded = tf.saved_model.load(export_dir)
    serve = loaded.signatures["serving_default"]
    keys, labels, class_ids, probabilities = [], [], [], []
    dataset = contract_lib.read_split(contract, contract_lib.data_dir(run_dir), split, batch_size)
    for inputs, batch_labels, batch_keys in dataset:
        outputs = serve(**{contract.input_feature: inputs})
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
