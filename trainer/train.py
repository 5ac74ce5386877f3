"""The one training entry: read the contract, build the model, fit, evaluate, save.

    python -m trainer.task --run-dir runs/r1 --set train.epochs=30

Writes RUN/train/: model.keras, metrics.json, history.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from kcp import storage
from kcp.config import Config, TrainConfig
from pipeline import contract as contract_lib

log = logging.getLogger("kcp.train")


def make_optimizer(config: TrainConfig):
    """The optimizer named by `train.optimizer`, with `train.learning_rate`."""
    import keras

    rate, decay = config.learning_rate, config.weight_decay or None
    name = config.optimizer
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else config.momentum
        return keras.optimizers.SGD(rate, momentum=momentum, nesterov=name == "nesterov", weight_decay=decay)
    if name == "adagrad":
        return keras.optimizers.Adagrad(rate, weight_decay=decay)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(rate, weight_decay=decay)
    if name == "adam":
        return keras.optimizers.Adam(rate, weight_decay=decay)
    if name == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=config.weight_decay)
    raise ValueError(f"train.optimizer: {name!r} is not supported")


def _throughput_timer():
    import keras

    class ThroughputTimer(keras.callbacks.Callback):
        """Seconds spent in training batches per epoch (validation excluded)."""

        def __init__(self):
            super().__init__()
            self.epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._last = self._start

        def on_train_batch_end(self, batch, logs=None):
            self._last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(self._last - self._start)

    return ThroughputTimer()


def examples_per_second(num_examples: int, epoch_seconds: list[float]) -> float:
    """Training throughput; the first epoch (tracing, cache fill) is left out when there are more."""
    steady = epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds
    seconds = sum(steady)
    return num_examples * len(steady) / seconds if seconds > 0 else 0.0


def _evaluate(model, dataset) -> dict:
    results = model.evaluate(dataset, verbose=0, return_dict=True)
    return {name: float(value) for name, value in results.items() if name != "compile_metrics"}


def train(config: Config, run_dir: str) -> dict:
    """Trains `config.model` on RUN/data and writes RUN/train/. Returns metrics.json's content."""
    import keras

    from trainer.data import make_dataset
    from trainer.models import ModelInputs, build_model

    started = time.perf_counter()
    contract = contract_lib.read_contract(run_dir)
    data_dir = contract_lib.data_dir(run_dir)
    train_dir = storage.join(run_dir, "train")
    storage.makedirs(train_dir)
    keras.utils.set_random_seed(config.train.seed)

    datasets = {
        split: make_dataset(contract, data_dir, split, config.train, training=False)
        for split in populated_splits(contract)
    }
    train_data = make_dataset(contract, data_dir, "train", config.train, training=True)
    model = build_model(ModelInputs.from_contract(contract), config.model)
    model.compile(optimizer=make_optimizer(config.train), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    timer = _throughput_timer()
    verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(train_data, validation_data=datasets.get("validation"), epochs=config.train.epochs,
                        callbacks=[timer], verbose=verbose,
                        shuffle=False)  # the tf.data pipeline shuffles

    metrics = {split: _evaluate(model, dataset) for split, dataset in datasets.items()}
    metrics.update({
        "epochs": len(history.history.get("loss", [])),
        "examples_per_second": examples_per_second(contract.splits["train"].count, timer.epoch_seconds),
        "wall_seconds": time.perf_counter() - started,
        "model": config.model.name,
        "params": int(model.count_params()),
    })
    history_plain = {name: [float(v) for v in values] for name, values in history.history.items()}
    storage.write_text_atomic(storage.join(train_dir, "history.json"), json.dumps(history_plain, indent=2) + "\n")
    _save_model(model, storage.join(train_dir, "model.keras"))
    storage.write_text_atomic(storage.join(train_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    return metrics


def populated_splits(contract) -> list[str]:
    """The splits that hold examples, in train/validation/test order."""
    return [split for split in ("train", "validation", "test") if contract.splits.get(split) and contract.splits[split].count]


def _save_model(model, path: str) -> None:
    """Saves to a temporary name first, so a crash never leaves a truncated model.keras."""
    temporary = path.replace(".keras", ".tmp.keras")
    model.save(temporary)
    storage.remove(path)
    storage.rename(temporary, path)
