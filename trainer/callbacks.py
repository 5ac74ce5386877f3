"""The trainer's callbacks and learning-rate schedules."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time

import keras

from kcp.core import storage
from kcp.core.config import TrainConfig
from kcp.core.errors import UserError

log = logging.getLogger("kcp.train")


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    """A float or a LearningRateSchedule for `train.schedule` (plateau: a float the callback lowers)."""
    rate = config.learning_rate
    if config.schedule in ("constant", "plateau"):
        return rate
    if config.schedule == "step":
        return keras.optimizers.schedules.ExponentialDecay(
            rate, decay_steps=config.decay_epochs * steps_per_epoch, decay_rate=config.decay_rate, staircase=True)
    total = config.epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total // 2)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps=total)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=total - warmup, warmup_target=rate,
                                                  warmup_steps=warmup)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the message names where and the likely causes."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises NonFiniteLossError at the first batch whose loss is NaN or infinite.

    One NaN poisons every weight for good, so going on (Keras' TerminateOnNaN only stops,
    and the run then saves and exports the poisoned model) is never useful. The error leaves
    `fit` before anything is saved: no model.keras, no export. The logged loss is the
    epoch's running mean, which stays non-finite once a batch made it so.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        raise NonFiniteLossError(
            f"training stopped: the loss became {float(loss)} at epoch {getattr(self, '_epoch', 0) + 1}, "
            f"batch {batch + 1}; likely causes: a learning rate too high (lower train.learning_rate or set "
            "train.clip_norm), inputs with nothing in them (text rows with no token, all-zero inputs), or "
            "NaN/infinite values in the data")


class ThroughputTimer(keras.callbacks.Callback):
    """Seconds spent in training batches per epoch (validation excluded)."""

    def __init__(self):
        super().__init__()
        self.epoch_seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(self._last - self._start)


def examples_per_second(num_examples: int, epoch_seconds: list[float]) -> float:
    """Training throughput; the first epoch (tracing, cache fill) is left out when there are more."""
    steady = epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds
    seconds = sum(steady)
    return num_examples * len(steady) / seconds if seconds > 0 else 0.0


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, with a backup that a kill at any instant leaves whole.

    Keras 3.x rewrites latest.weights.h5 and then training_metadata.json in place: a kill
    inside the first leaves a truncated HDF5 file, inside the second an empty JSON file
    (the resume dies in `json.loads`), and between the two new weights beside the previous
    epoch's number (the resume re-runs an epoch on weights that already saw it). Here each
    backup's weights go to a file of their own, and the metadata, replaced atomically after
    them, names that file; older weight files are removed only then. The metadata therefore
    always names a complete pair, and a resume restores the last backup that finished.

    The backup also outlives `fit`: it is removed by `delete_backup()`, which the trainer calls
    only after model.keras and metrics.json are written (Keras removes it at the end of fit).
    """

    def _save_model(self):
        storage.makedirs(self.backup_dir)
        name = f"epoch{self._current_epoch:05d}-batch{self._last_batch_seen:06d}.weights.h5"
        self.model.save_weights(storage.join(self.backup_dir, name), overwrite=True)
        previous = self._read_metadata()
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name,
                    "fingerprint": self._fingerprint()}
        if self._multi_worker() and previous and previous.get("epoch", 0) < self._current_epoch:
            # a worker killed while the others saved this epoch has only the one before: keep it,
            # so that every worker can restore the epoch they all have (`_load_model`)
            metadata["previous"] = {key: previous[key] for key in ("epoch", "batch", "weights")}
        storage.write_text_atomic(self._training_metadata_path, json.dumps(metadata))
        kept = {name, metadata.get("previous", {}).get("weights")}
        for path in storage.glob(storage.join(self.backup_dir, "*.weights.h5")):
            if path.rsplit("/", 1)[-1] not in kept:
                storage.remove(path)

    def _read_metadata(self) -> dict | None:
        if not storage.exists(self._training_metadata_path):
            return None
        return json.loads(storage.read_text(self._training_metadata_path))

    def _multi_worker(self) -> bool:
        if keras.backend.backend() != "tensorflow":  # tf.distribute is TensorFlow's (other backends: one worker)
            return False
        import tensorflow as tf

        return isinstance(self.model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def _smallest_over_workers(self, value: int) -> int:
        """The smallest of `value` over the workers (`value` itself with one worker): a collective
        every worker calls, the same number of times, at the same point."""
        if not self._multi_worker():
            return value
        import tensorflow as tf

        strategy = self.model.distribute_strategy
        values = strategy.experimental_distribute_values_from_function(lambda _: tf.constant([value], tf.int64))
        return int(tf.reduce_min(strategy.gather(values, axis=0)))

    def _load_model(self):
        """Restores the backup. Under multi_worker the workers agree, by two collectives, on the last
        epoch every one of them backed up (a kill can land while some have saved epoch k and others
        only k-1: each restoring its own would run them out of step, and a collective then aborts on
        mismatched tensors, run after run), and on whether each holds that epoch's weights (its
        latest or the one before); if one does not, all start at epoch 1 rather than one failing alone
        while the others wait in their first collective."""
        metadata = self._read_metadata()
        if metadata is not None and not self.model.built:
            raise ValueError("BackupAndRestore needs a built model before fit(); build it on a batch first")
        planned = (self.params or {}).get("epochs")
        if metadata is not None and (metadata.get("fingerprint", self._fingerprint()) != self._fingerprint() or (
                planned is not None and metadata["epoch"] > planned)):
            # made by another model, data contract or schedule (config changed, data preprocessed
            # again): restoring it would fail on shapes or silently skip epochs, so start afresh
            log.warning("backup %s: made by another model, data or schedule than this run's; "
                        "it is discarded and training starts at epoch 1", self.backup_dir)
            storage.remove_tree(self.backup_dir)
            metadata = None
        epoch = self._smallest_over_workers(metadata["epoch"] if metadata else 0)
        chosen = metadata if metadata and metadata["epoch"] == epoch else (metadata or {}).get("previous") or {}
        weights = storage.join(self.backup_dir, chosen.get("weights", "latest.weights.h5"))  # Keras' own name: older
        held = bool(epoch) and chosen.get("epoch") == epoch and storage.exists(weights)
        if not held and metadata is not None:  # e.g. a weights file removed by hand: no traceback, a fresh start
            log.warning("backup %s: no weights of epoch %d here", self.backup_dir, epoch)
        if not self._smallest_over_workers(int(held)) or not epoch:
            if metadata is not None:
                log.warning("backup %s: not every worker holds the weights of epoch %d, the last one all of them "
                            "backed up; every worker starts at epoch 1", self.backup_dir, epoch)
                storage.remove_tree(self.backup_dir)
            return
        if chosen is not metadata:  # this worker's latest is ahead of the others': it goes back to the one before
            log.warning("backup %s: resuming after epoch %d, the last one every worker backed up", self.backup_dir,
                        epoch)
            # the backup now says what was restored, so the next save keeps these weights as its previous
            storage.write_text_atomic(self._training_metadata_path, json.dumps(
                {**{key: chosen[key] for key in ("epoch", "batch", "weights")}, "fingerprint": self._fingerprint()}))
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        self.model._initial_epoch = epoch
        log.info("train: resuming after epoch %d, from the backup in %s", epoch, self.backup_dir)

    def on_train_begin(self, logs=None):
        self._load_model()

    def _fingerprint(self) -> str:
        """What the backup is valid for: every weight's shape (model family and keys, input shape,
        classes) and the optimizer's config (its schedule, which spans the planned epochs)."""
        optimizer = self.model.optimizer.get_config() if self.model.optimizer is not None else {}
        # a plain learning rate is left out: ReduceLROnPlateau lowers it while training runs
        optimizer = {key: value for key, value in optimizer.items()
                     if key != "name" and not (key == "learning_rate" and isinstance(value, (int, float)))}
        described = {"weights": [list(weight.shape) for weight in self.model.weights], "optimizer": optimizer}
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def on_train_end(self, logs=None):
        """Keeps the backup: Keras deletes it here, but the trainer still evaluates, predicts and
        writes model.keras and metrics.json after fit, and a preemption in that window must resume
        from the last epoch, not from epoch 1. Whoever saves the results calls `delete_backup()`."""

    def delete_backup(self) -> None:
        """Removes the backup (when `delete_checkpoint`): call once the run's results are saved."""
        if self.delete_checkpoint:
            storage.remove_tree(self.backup_dir)


class EpochHistory(keras.callbacks.Callback):
    """Writes history.json after every epoch, keeping the epochs before a resumed one.

    Entry i is epoch i + 1. On a fresh start (epoch 0) the file is rewritten; after a
    BackupAndRestore resume at epoch k, entries 0..k-1 from the killed run are kept, so a
    5-epoch run killed after epoch 2 and resumed holds 5 entries, not 7.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.history: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0 or not self.history:
            previous = json.loads(storage.read_text(self.path)) if epoch and storage.exists(self.path) else {}
            self.history = {name: values[:epoch] for name, values in previous.items()}
        for name, value in (logs or {}).items():
            values = self.history.setdefault(name, [])
            del values[epoch:]
            values.append(float(value))
        self.history.setdefault("learning_rate", [])
        del self.history["learning_rate"][epoch:]
        self.history["learning_rate"].append(current_learning_rate(self.model.optimizer))
        storage.write_text_atomic(self.path, json.dumps(self.history, indent=2) + "\n")


def current_learning_rate(optimizer) -> float:
    rate = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(rate))


def steps_per_epoch(num_examples: int, global_batch: int, drop_remainder: bool) -> int:
    return max(1, num_examples // global_batch if drop_remainder else math.ceil(num_examples / global_batch))


class LanguageMetrics(keras.callbacks.Callback):
    """Adds `perplexity` and `bits_per_byte` (and their `val_` twins) to the epoch's logs, from
    `nats_per_token`: put first, so that the history, TensorBoard and the checkpoint see them.

    `convert(nats_per_token, splits)` gives {"perplexity", "bits_per_byte"}; bits per byte
    depend on the split's tokens per byte, so the fitted splits and the validation split are named.
    """

    def __init__(self, convert, fit_splits, validation_split: str | None):
        super().__init__()
        self.convert, self.fit_splits, self.validation_split = convert, fit_splits, validation_split

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if "nats_per_token" in logs:
            logs.update(self.convert(float(logs["nats_per_token"]), splits=self.fit_splits))
        if "val_nats_per_token" in logs and self.validation_split:
            logs.update({f"val_{name}": value for name, value in
                         self.convert(float(logs["val_nats_per_token"]), splits=self.validation_split).items()})


class LanguageSamples(keras.callbacks.Callback):
    """After every epoch, appends {"epoch", "prompt", "completion"} to a JSON-lines file:
    `sample(model)` completes the fixed `prompt` greedily, so the lines show what training changed.
    Like EpochHistory, a resumed run keeps the lines of the epochs before the resumed one."""

    def __init__(self, path: str, prompt: str, sample):
        super().__init__()
        self.path, self.prompt, self.sample = path, prompt, sample
        self.started = False

    def on_epoch_begin(self, epoch, logs=None):
        """At the first epoch this fit runs, the lines of any later epoch go (an older, longer training's):
        a fresh start keeps none, a resume those before the resumed epoch, so a kill before this
        training's first sample leaves no older training's samples looking like its own."""
        if self.started:
            return
        self.started = True
        if storage.exists(self.path):
            lines = storage.read_text(self.path).splitlines() if epoch else []
            kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= epoch]
            if kept:
                storage.write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
            else:
                storage.remove(self.path)

    def on_epoch_end(self, epoch, logs=None):
        lines = storage.read_text(self.path).splitlines() if epoch and storage.exists(self.path) else []
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= epoch]
        record = {"epoch": epoch + 1, "prompt": self.prompt, "completion": self.sample(self.model)}
        storage.write_text_atomic(self.path, "".join(f"{line}\n" for line in [*kept, json.dumps(record)]))
