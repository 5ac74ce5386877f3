"""What the trainer writes and where: the paths of this process (chief or worker, AIP_*
folders), model.keras and metrics.json saved so that no reader sees half of one or pairs a
model with another model's metrics, and the figures computed from a trained model.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import numpy as np

from kcp.core import storage
from kcp.core.layout import RunLayout
from kcp.core.cluster import worker_info


@dataclass(frozen=True)
class TrainPaths:
    """Where this process writes; non-chief workers of a cluster keep to their own folder."""

    train_dir: str
    outputs: str  # model.keras, metrics.json, history.json, confusion_matrix.json
    checkpoints: str
    backup: str
    logs: str
    model_copy: str | None  # AIP_MODEL_DIR
    chief: bool

    @classmethod
    def resolve(cls, run_dir: str, multi_worker: bool) -> "TrainPaths":
        train_dir = RunLayout(run_dir).train
        task_type, index, chief = worker_info() if multi_worker else ("worker", 0, True)
        checkpoint_root = os.environ.get("AIP_CHECKPOINT_DIR") or train_dir
        backup = storage.join(checkpoint_root, "backup")
        if multi_worker:  # Keras' BackupAndRestore is not multi-worker aware: one folder per worker
            backup = storage.join(backup, f"{task_type}-{index}")
        outputs = train_dir if chief else storage.join(train_dir, f"{task_type}-{index}")
        return cls(
            train_dir=train_dir,
            outputs=outputs,
            checkpoints=storage.join(checkpoint_root if chief else outputs, "checkpoints"),
            backup=backup,
            logs=os.environ.get("AIP_TENSORBOARD_LOG_DIR") or storage.join(train_dir, "logs"),
            model_copy=os.environ.get("AIP_MODEL_DIR") if chief else None,
            chief=chief,
        )


def weights_digest(model) -> str:
    """SHA-256 of every weight's bytes, in order: equal digests mean identical models."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight)).tobytes())
    return digest.hexdigest()


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> list[list[int]]:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix.tolist()


def predict_labels(model, dataset, one_hot: bool) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over a dataset of (inputs, labels) batches, in order."""
    labels = np.concatenate([np.asarray(batch_labels) for _, batch_labels in dataset])
    if one_hot:
        labels = labels.argmax(axis=-1)
    predictions = model.predict(dataset.map(lambda inputs, _: inputs), verbose=0).argmax(axis=-1)
    return labels, predictions


def save_results(model, model_dir: str | None, metrics_dir: str, metrics_text: str) -> None:
    """model.keras (into `model_dir`; None: no model, non-chief workers) and metrics.json, so
    that no reader ever pairs a model with another model's metrics (validate compares an export
    with metrics.json's test accuracy).

    Neither order of two atomic writes is enough: model first leaves new model + old metrics
    after a kill between them, metrics first the reverse. So the old metrics.json is removed
    first (then readers see no metrics and stop with "metrics.json not found" rather than
    compare against the wrong ones), the model is replaced atomically, and the new metrics.json
    is written last. The preemption backup is still there until after this, so a rerun after
    a kill anywhere here re-evaluates from the last epoch and writes both again.
    """
    metrics_path = storage.join(metrics_dir, "metrics.json")
    if model_dir is not None:
        storage.remove(metrics_path)
        save_model(model, storage.join(model_dir, "model.keras"))
    storage.write_text_atomic(metrics_path, metrics_text)


def save_model(model, path: str) -> None:
    """Saves to a unique temporary beside `path` (its name ends in .keras, as Keras requires),
    then renames it over `path`: the rename replaces the old file (os.replace locally; on gs://
    a copy, which overwrites, and a delete of the temporary), so at every instant `path` is the
    old model or the whole new one, and concurrent savers never share a temporary.

    A process killed inside the save or before the rename leaves its temporary behind (no
    `finally` runs under SIGKILL); the next save removes such leftovers first. No other saver
    can be writing one then: the run directory's lock admits one trainer, and only its chief saves.
    """
    directory, name = (path.rsplit("/", 1) if storage.is_remote(path) else os.path.split(path))
    stem = name.removesuffix(".keras")
    remove_stale_temporaries(directory, stem)
    temporary = storage.join(directory, f"{stem}.tmp-{uuid.uuid4().hex[:12]}.keras") if directory \
        else f"{stem}.tmp-{uuid.uuid4().hex[:12]}.keras"
    try:
        model.save(temporary)
        storage.rename(temporary, path)
    except BaseException:
        storage.remove(temporary)
        raise


def remove_stale_temporaries(directory: str, stem: str) -> list[str]:
    """Deletes the `STEM.tmp-*.keras` files a killed save left in `directory`; returns their paths."""
    pattern = storage.join(directory, f"{stem}.tmp-*.keras") if directory else f"{stem}.tmp-*.keras"
    stale = storage.glob(pattern)
    for leftover in stale:
        storage.remove(leftover)
    return stale
