"""The one training entry: read the contract, build the model in the strategy scope, fit,
evaluate, save.

    python -m trainer.task --run-dir runs/r1 --set train.epochs=30

Writes RUN/train/: model.keras, metrics.json, history.json, confusion_matrix.json,
checkpoints/best.weights.h5, logs/ (TensorBoard), backup/ (while running; preemption).
On Vertex AI, AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR and AIP_MODEL_DIR take over
checkpoints/backup, logs, and receive a copy of model.keras and metrics.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from kcp.core import storage
from kcp.core.config import Config, TrainConfig
from kcp.core import contract as contract_lib
from kcp.core.layout import SPLITS, RunLayout

log = logging.getLogger("kcp.train")


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
        from trainer.distribute import worker_info

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


def make_optimizer(config: TrainConfig, rate):
    """The optimizer named by `train.optimizer` with learning rate (or schedule) `rate`."""
    import keras

    decay = config.weight_decay or None
    common = {"weight_decay": decay, "global_clipnorm": config.clip_norm or None}
    name = config.optimizer
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else config.momentum
        return keras.optimizers.SGD(rate, momentum=momentum, nesterov=name == "nesterov", **common)
    if name == "adagrad":
        return keras.optimizers.Adagrad(rate, **common)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(rate, **common)
    if name == "adam":
        return keras.optimizers.Adam(rate, **common)
    if name == "adamw":
        return keras.optimizers.AdamW(rate, **{**common, "weight_decay": config.weight_decay})
    raise ValueError(f"train.optimizer: {name!r} is not supported")


def loss_and_metrics(config: TrainConfig, num_classes: int):
    """Sparse labels, unless label smoothing needs one-hot ones; top-5 accuracy above 5 classes."""
    import keras

    one_hot = config.label_smoothing > 0
    if one_hot:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    metrics = ["accuracy"]
    if num_classes > 5:
        top5 = keras.metrics.TopKCategoricalAccuracy if one_hot else keras.metrics.SparseTopKCategoricalAccuracy
        metrics.append(top5(k=5, name="top5_accuracy"))
    return loss, metrics, one_hot


def make_callbacks(config: TrainConfig, paths: TrainPaths, has_validation: bool):
    import keras

    from trainer.callbacks import AtomicBackupAndRestore, EpochHistory, ThroughputTimer

    timer = ThroughputTimer()
    monitor = config.monitor if has_validation or not config.monitor.startswith("val_") else config.monitor[4:]
    callbacks = [
        timer,
        AtomicBackupAndRestore(paths.backup, delete_checkpoint=True),
        EpochHistory(storage.join(paths.outputs, "history.json")),
        keras.callbacks.ModelCheckpoint(storage.join(paths.checkpoints, "best.weights.h5"), monitor=monitor,
                                        mode=config.monitor_mode, save_best_only=True, save_weights_only=True),
    ]
    if paths.chief:
        callbacks.append(keras.callbacks.TensorBoard(paths.logs, profile_batch=0))
    if config.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=config.monitor_mode,
                                                       patience=config.early_stopping_patience,
                                                       restore_best_weights=True))
    if config.schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=config.monitor_mode,
                                                           factor=config.decay_rate,
                                                           patience=config.plateau_patience))
    return callbacks, timer


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


def train(config: Config, run_dir: str) -> dict:
    """Trains `config.model` on RUN/data and writes RUN/train/. Returns metrics.json's content."""
    import keras
    import tensorflow as tf

    from trainer.callbacks import examples_per_second, learning_rate, steps_per_epoch
    from trainer.data import make_dataset
    from trainer.distribute import choose_strategy, num_workers
    from trainer.models import ModelInputs, build_model

    started = time.perf_counter()
    train_config = config.train
    contract = contract_lib.read_contract(run_dir)
    data_dir = contract_lib.data_dir(run_dir)
    if train_config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = choose_strategy(train_config.strategy, train_config.cpu_devices)
    paths = TrainPaths.resolve(run_dir, multi_worker=train_config.strategy == "multi_worker")
    storage.makedirs(paths.outputs)
    keras.utils.set_random_seed(train_config.seed)
    keras.mixed_precision.set_global_policy(train_config.precision)

    replicas = strategy.num_replicas_in_sync
    workers = num_workers() if train_config.strategy == "multi_worker" else 1
    global_batch = train_config.batch_size * replicas
    drop_remainder = isinstance(strategy, tf.distribute.TPUStrategy)  # TPUs need static shapes
    loss, metrics, one_hot = loss_and_metrics(train_config, contract.num_classes)
    splits = [split for split in SPLITS if split in contract.splits and contract.splits[split].count]

    vectorizer = contract_lib.text_vectorizer(contract, run_dir) if contract.modality == "text" else None

    def dataset(split, training):
        return make_dataset(contract, data_dir, split, train_config, global_batch=global_batch, training=training,
                            drop_remainder=drop_remainder and training, one_hot=one_hot, workers=workers,
                            vectorizer=vectorizer)

    evaluation = {split: dataset(split, training=False) for split in splits}
    fitted = contract.splits["train"].count + (contract.splits["validation"].count if train_config.include_validation
                                                 and "validation" in contract.splits else 0)
    steps = steps_per_epoch(fitted, global_batch, drop_remainder)
    model_config = config.model
    if model_config.sync_batch_norm is None:
        model_config = dataclasses.replace(model_config, sync_batch_norm=replicas > 1)
    with strategy.scope():
        model = build_model(ModelInputs.from_contract(contract), model_config)
        model.compile(optimizer=make_optimizer(train_config, learning_rate(train_config, steps)), loss=loss,
                      metrics=metrics, jit_compile="auto" if train_config.jit_compile is None else train_config.jit_compile,
                      steps_per_execution=train_config.steps_per_execution)
    fit_splits = ["train", "validation"] if train_config.include_validation and "validation" in evaluation else "train"
    validation = None if fit_splits != "train" else evaluation.get("validation")
    callbacks, timer = make_callbacks(train_config, paths, validation is not None)
    log.info("train: %s on %d replica(s), global batch %d, %d steps per epoch", config.model.name, replicas,
             global_batch, steps)
    history = model.fit(dataset(fit_splits, training=True), validation_data=validation,
                        epochs=train_config.epochs, callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2,
                        shuffle=False)  # the tf.data pipeline shuffles

    results = {split: {name: float(value) for name, value in model.evaluate(data, verbose=0, return_dict=True).items()}
               for split, data in evaluation.items()}
    history_path = storage.join(paths.outputs, "history.json")
    epochs_done = len(json.loads(storage.read_text(history_path)).get("loss", [])) if storage.exists(history_path) \
        else len(history.history.get("loss", []))
    metrics_json = {
        **results,
        "epochs": epochs_done,
        "examples_per_second": examples_per_second(fitted, timer.epoch_seconds),
        "wall_seconds": time.perf_counter() - started,
        "model": config.model.name,
        "params": int(model.count_params()),
        "replicas": replicas,
        "global_batch_size": global_batch,
        "weights_sha256": weights_digest(model),
    }
    if "test" in evaluation:
        labels, predictions = predict_labels(model, evaluation["test"], one_hot)
        matrix = {"class_names": list(contract.class_names), "matrix": confusion_matrix(labels, predictions,
                                                                                          contract.num_classes)}
        storage.write_text_atomic(storage.join(paths.outputs, "confusion_matrix.json"), json.dumps(matrix) + "\n")
    if paths.chief:
        _save_model(model, storage.join(paths.outputs, "model.keras"))
    storage.write_text_atomic(storage.join(paths.outputs, "metrics.json"), json.dumps(metrics_json, indent=2) + "\n")
    if paths.model_copy:
        storage.makedirs(paths.model_copy)
        _save_model(model, storage.join(paths.model_copy, "model.keras"))
        storage.write_text_atomic(storage.join(paths.model_copy, "metrics.json"), json.dumps(metrics_json, indent=2))
    return metrics_json


def predict_labels(model, dataset, one_hot: bool) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over a dataset of (inputs, labels) batches, in order."""
    labels = np.concatenate([np.asarray(batch_labels) for _, batch_labels in dataset])
    if one_hot:
        labels = labels.argmax(axis=-1)
    predictions = model.predict(dataset.map(lambda inputs, _: inputs), verbose=0).argmax(axis=-1)
    return labels, predictions


def _save_model(model, path: str) -> None:
    """Saves to a temporary name first, so a crash never leaves a truncated model.keras."""
    temporary = path.replace(".keras", ".tmp.keras")
    model.save(temporary)
    storage.remove(path)
    storage.rename(temporary, path)
