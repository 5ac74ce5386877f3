"""The one training entry: read the contract, build the model in the strategy scope, fit,
evaluate, save.

    python -m trainer.task --run-dir runs/r1 --set train.epochs=30

`Trainer(config, run_dir)` is the entry that `kcp train` and the tuner share: `build()`
gives the compiled model of `config.model`, `fit()` fits it on the contract's splits,
`evaluate()` scores it, and `run()` (what `train(config, run_dir)` does) writes RUN/train/:
model.keras, metrics.json, history.json, confusion_matrix.json, checkpoints/best.weights.h5,
logs/ (TensorBoard), backup/ (while running; preemption). On Vertex AI, AIP_CHECKPOINT_DIR,
AIP_TENSORBOARD_LOG_DIR and AIP_MODEL_DIR take over checkpoints/backup, logs, and receive a
copy of model.keras and metrics.json.

Language contracts (a gpt model) train on next-token pairs with a cross-entropy that ignores
padding; each split gets `nats_per_token`, `perplexity` and `bits_per_byte` (exact: token-
weighted, converted with the contract's token and byte counts), no confusion matrix, and
samples.jsonl: a greedy completion of a fixed prompt after every epoch. The gpt family's
training defaults (AdamW, warmup + cosine, clipping, `val_loss`) are its config's
`training_defaults`, applied when the config is loaded (kcp/core/config_load.py); the
language metrics are in trainer/language_metrics.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time

import keras
import tensorflow as tf

from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core import storage
from kcp.core.config import Config, TrainConfig
from kcp.core.layout import SPLITS, RunLayout
from trainer.batch_norm import batch_norm_layers, reestimate_batch_norm, sample_steps
from trainer.callbacks import (AtomicBackupAndRestore, EpochHistory, LanguageMetrics, LanguageSamples,
                               StopOnNonFiniteLoss, ThroughputTimer, examples_per_second, learning_rate,
                               steps_per_epoch)
from trainer.data import files_split_evenly, make_dataset, per_worker_dataset
from trainer.language_metrics import fit_document_cache, language_split_metrics
from trainer.objectives import loss_and_metrics, make_optimizer, one_hot_labels
from kcp.core.cluster import effective_strategy, num_workers
from trainer.distribute import check_workers_agree, choose_strategy, flat_settings, lost_peer_said
from trainer.models import ModelInputs, build_model
from trainer.models.common import batch_norm_momentum_for
from trainer.outputs import TrainPaths, confusion_matrix, predict_labels, save_results, weights_digest

log = logging.getLogger("kcp.train")

class Trainer:
    """`config` on the contract of `run_dir`: its strategy, datasets, compiled model, fit and scores.

    Creating one reads the contract and picks the strategy (and turns on op determinism when
    `train.deterministic`); nothing is built or written until a method is called.
    """

    def __init__(self, config: Config, run_dir: str):
        self.started = time.perf_counter()
        self.config, self.run_dir = config, run_dir
        settings = config.train
        self.contract = contract_lib.read_contract(run_dir)
        self.data_dir = contract_lib.data_dir(run_dir)
        if settings.deterministic:
            tf.config.experimental.enable_op_determinism()
        strategy = effective_strategy(settings.strategy)  # auto in a TF_CONFIG cluster: multi_worker
        self.strategy = choose_strategy(strategy, settings.cpu_devices)  # before TF starts its devices
        self.vectorizer = example_lib.text_vectorizer(self.contract, run_dir) if self.contract.modality == "text" \
            else None
        self.language = self.contract.modality == "language"
        self.multi_worker = strategy == "multi_worker"
        if self.multi_worker:  # before any collective of training: one line if a worker was given other settings
            check_workers_agree(self.strategy, {**flat_settings(config.to_dict()), "train.strategy": strategy,  # as run
                                                "the data (metadata.json)": storage.sha256(RunLayout(run_dir).metadata)})
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = settings.batch_size * self.replicas
        self.drop_remainder = isinstance(self.strategy, tf.distribute.TPUStrategy)  # TPUs need static shapes
        self.one_hot = one_hot_labels(settings) and not self.language
        splits = self.contract.splits
        self.splits = [split for split in SPLITS if split in splits and splits[split].count]
        with_validation = settings.include_validation and "validation" in self.splits
        fit_names = ["train", "validation"] if with_validation else ["train"]
        self.fit_splits = fit_names if with_validation else "train"
        self.fitted = sum(splits[name].count for name in fit_names)
        self.steps = steps_per_epoch(self.fitted, self.global_batch, self.drop_remainder)
        self.own_files = self.multi_worker and files_split_evenly(self.contract, self.data_dir, self.fit_splits,
                                                                  num_workers())
        if self.own_files:  # endless data: Keras runs whole executions, so an epoch is a multiple of them
            self.steps = -(-self.steps // settings.steps_per_execution) * settings.steps_per_execution

    def dataset(self, split, training: bool):
        """Batches of (inputs, labels) of `split` (a name or a list of names) for fit or evaluate;
        multi-worker training reads each worker's own files where they split evenly (`own_files`)."""
        common = {"one_hot": self.one_hot, "vectorizer": self.vectorizer}
        if training and self.own_files:
            return per_worker_dataset(self.strategy, self.contract, self.data_dir, split, self.config.train,
                                      global_batch=self.global_batch, **common)
        return make_dataset(self.contract, self.data_dir, split, self.config.train, global_batch=self.global_batch,
                            training=training, drop_remainder=self.drop_remainder and training,
                            workers=num_workers() if self.multi_worker else 1, **common)

    @functools.cached_property
    def evaluation(self) -> dict:
        """{split: evaluation dataset} for every split with examples (validation data included)."""
        return {split: self.dataset(split, training=False) for split in self.splits}

    @property
    def validation(self):
        """The validation data of fit; None when validation is part of the training data."""
        return self.evaluation.get("validation") if self.fit_splits == "train" else None

    def build(self):
        """The model of `config.model`, built and compiled in the strategy scope: optimizer and
        schedule, loss and metrics, XLA and steps per execution as `config.train` says."""
        settings = self.config.train
        keras.mixed_precision.set_global_policy(settings.precision)
        model_config = self.config.model
        if model_config.sync_batch_norm is None:
            model_config = dataclasses.replace(model_config, sync_batch_norm=self.replicas > 1)
        if model_config.batch_norm_momentum is None:  # short runs: moving statistics that forget the start
            model_config = dataclasses.replace(
                model_config, batch_norm_momentum=batch_norm_momentum_for(settings.epochs * self.steps))
        with self.strategy.scope():  # the metrics too: a Keras 3 metric makes its variables when constructed, and
            # made outside the scope they count each worker's share alone under multi_worker
            loss, metrics = loss_and_metrics(settings, self.contract.num_classes, self.contract.modality)
            model = build_model(ModelInputs.from_contract(self.contract), model_config)
            optimizer = make_optimizer(settings, learning_rate(settings, self.steps), decay_matrices_only=self.language,
                                       variables=model.trainable_variables)
            model.compile(optimizer=optimizer, loss=loss,
                          metrics=metrics, jit_compile="auto" if settings.jit_compile is None
                          else settings.jit_compile, steps_per_execution=settings.steps_per_execution)
        return model

    def fit(self, model, callbacks=(), **fit_kwargs):
        """`model.fit` on the training splits, validating on validation unless it is trained on;
        `fit_kwargs` (epochs, initial_epoch, verbose...) override the config's. Returns the History."""
        fit_kwargs = {"epochs": self.config.train.epochs, "verbose": 1 if sys.stdout.isatty() else 2, **fit_kwargs}
        if self.language:  # first: the epoch's perplexity and bits per byte reach every later callback's logs
            callbacks = [LanguageMetrics(functools.partial(language_split_metrics, contract=self.contract),
                                         self.fit_splits, "validation" if self.validation is not None else None),
                         *callbacks]
        return model.fit(self.dataset(self.fit_splits, training=True), validation_data=self.validation,
                         steps_per_epoch=self.steps if self.own_files else None,  # own files repeat without end
                         callbacks=list(callbacks), shuffle=False, **fit_kwargs)  # the tf.data pipeline shuffles

    def reestimate_batch_norm(self, model) -> int:
        """BatchNorm's moving statistics set to those of a sample of the training data under the
        final weights (trainer/batch_norm.py), before anything is evaluated or saved. Returns the
        number of batches used (0: the model has no BatchNorm)."""
        if not batch_norm_layers(model):
            return 0
        # in a fixed order, whole batches, not cached: a sample stops before the end, and a cache read in
        # part is thrown away (tf.data then warns, "did not fully read the dataset being cached")
        data = make_dataset(self.contract, self.data_dir, self.fit_splits, dataclasses.replace(
                                self.config.train, cache=False),
                            global_batch=self.global_batch, training=False, drop_remainder=True,
                            workers=num_workers() if self.multi_worker else 1, one_hot=self.one_hot,
                            vectorizer=self.vectorizer)
        used = reestimate_batch_norm(model, self.strategy, self.strategy.experimental_distribute_dataset(data),
                                     sample_steps(self.fitted, self.global_batch), seed=self.config.train.seed)
        if used:
            log.info("train: BatchNorm statistics re-estimated over %d training batches", used)
        return used

    def evaluate(self, model) -> dict:
        """{split: {metric: value}} for every split with examples (language: with perplexity and bits_per_byte)."""
        results = {}
        for split, data in self.evaluation.items():
            scores = {name: float(value) for name, value in model.evaluate(data, verbose=0, return_dict=True).items()}
            if self.language:
                scores.update(language_split_metrics(scores["nats_per_token"], self.contract, split))
            results[split] = scores
        return results

    def sample_prompt(self) -> list[int]:
        """The fixed prompt of the per-epoch samples: the start of the first document that begins
        in the first validation (else train) block, at most a quarter of the context."""
        split = "validation" if "validation" in self.splits else "train"
        inputs, _, _ = next(iter(example_lib.read_split(self.contract, self.data_dir, split, 1)))
        block = [int(token) for token in inputs.numpy()[0]]
        separator = contract_lib.LANGUAGE_SEPARATOR
        start = block.index(separator) + 1 if separator in block[:-8] else 0
        prompt = []
        for token in block[start:start + max(4, len(block) // 4)]:
            if token in (separator, contract_lib.LANGUAGE_PAD):
                break
            prompt.append(token)
        return prompt

    def run(self) -> dict:
        """Builds, fits with the trainer's callbacks, evaluates and writes RUN/train/ (or the
        AIP_* folders). Returns metrics.json's content."""
        settings = self.config.train
        paths = TrainPaths.resolve(self.run_dir, multi_worker=self.multi_worker)
        storage.makedirs(paths.outputs)
        keras.utils.set_random_seed(settings.seed)
        model = self.build()
        callbacks, timer = make_callbacks(settings, paths, self.validation is not None)
        if self.language and paths.chief:
            callbacks.append(self.samples_callback(paths))
        log.info("train: %s on %d replica(s), global batch %d, %d steps per epoch%s", self.config.model.name,
                 self.replicas, self.global_batch, self.steps, "" if not self.multi_worker else
                 "; each worker reads its own files" if self.own_files else "; each worker reads every file")
        if paths.chief:
            discard_results(paths)
        with lost_peer_said(self.multi_worker):
            history = self.fit(model, callbacks)
            self.reestimate_batch_norm(model)
            results = self.evaluate(model)
        history_path = storage.join(paths.outputs, "history.json")
        epochs_done = len(json.loads(storage.read_text(history_path)).get("loss", [])) \
            if storage.exists(history_path) else len(history.history.get("loss", []))
        metrics_json = {
            **results,
            "epochs": epochs_done,
            "examples_per_second": examples_per_second(self.fitted, timer.epoch_seconds),
            **({"tokens_per_second": examples_per_second(self.fitted, timer.epoch_seconds)
                * int(self.contract.statistics["context_length"])} if self.language else {}),
            "wall_seconds": time.perf_counter() - self.started,
            "model": self.config.model.name,
            "params": int(model.count_params()),
            "replicas": self.replicas,
            "global_batch_size": self.global_batch,
            "weights_sha256": weights_digest(model),
        }
        if self.language:
            validation = ["validation"] if self.validation is not None else []  # held out of fit
            metrics_json["document_cache"] = fit_document_cache(
                model, self.contract, self.run_dir, self.data_dir,
                validation + (["test"] if "test" in self.splits else []))
        if "test" in self.evaluation and not self.language:
            labels, predictions = predict_labels(model, self.evaluation["test"], self.one_hot)
            matrix = {"class_names": list(self.contract.class_names),
                      "matrix": confusion_matrix(labels, predictions, self.contract.num_classes)}
            storage.write_text_atomic(storage.join(paths.outputs, "confusion_matrix.json"), json.dumps(matrix) + "\n")
        # the fingerprint of the data contract this model was trained on: export refuses another one
        metrics_json["contract_sha256"] = storage.sha256(RunLayout(self.run_dir).metadata)
        text = json.dumps(metrics_json, indent=2) + "\n"
        save_results(model, paths.outputs if paths.chief else None, paths.outputs, text)
        if paths.model_copy:
            storage.makedirs(paths.model_copy)
            save_results(model, paths.model_copy, paths.model_copy, text)
        for callback in callbacks:  # only now: a kill before this point resumes from the last epoch
            if isinstance(callback, AtomicBackupAndRestore):
                callback.delete_backup()
        if self.multi_worker:  # each worker removed its backup/TASK-N; the last one out removes backup/
            storage.remove_empty_folder(os.path.dirname(paths.backup))
        return metrics_json

    def samples_callback(self, paths: TrainPaths) -> LanguageSamples:
        """Writes RUN/train/samples.jsonl: after every epoch, the greedy completion of `sample_prompt`."""
        from trainer.generate import generate_tokens  # the gpt family's sampler; imported for language runs only

        vocabulary = contract_lib.language_vocabulary(self.run_dir, self.contract)
        tokenizer = contract_lib.language_tokenizer(self.contract)
        prompt = self.sample_prompt()
        separator = contract_lib.LANGUAGE_SEPARATOR
        # the whole prompt (a quarter of the context at most) and its separator stay in the context
        count = min(SAMPLE_TOKENS, int(self.contract.statistics["context_length"]) - 2 - len(prompt))

        @tf.function(autograph=False)
        def complete(model, prompt_ids):
            return generate_tokens(model, prompt_ids, count, temperature=0.0)

        def sample(model) -> str:
            new = [int(token) for token in complete(model, tf.constant([separator, *prompt], tf.int32)).numpy()]
            new = new[:new.index(separator)] if separator in new else new
            return contract_lib.decode_language(new, tokenizer, vocabulary)

        return LanguageSamples(storage.join(paths.outputs, "samples.jsonl"),
                               contract_lib.decode_language(prompt, tokenizer, vocabulary), sample)


SAMPLE_TOKENS = 64  # per epoch: about 0.1-0.3 s with the cache on 2 CPU cores for the default model


def discard_results(paths: TrainPaths) -> None:
    """Removes the previous training's metrics.json, model.keras and confusion_matrix.json before
    this one fits: from here on RUN/train/ holds this training's history.json (and RUN/config.yaml
    its config), so a kill before `save_results` must not leave the old model looking like this
    training's finished result (`kcp export` would export it silently). Readers then find no
    finished model and say so; the rerun resumes from the preemption backup and writes them anew.
    Done on every start, a resume included: what is there then is at best the same weights that the
    resumed run saves again (a kill after model.keras), or an older training's results."""
    for name in ("metrics.json", "model.keras", "confusion_matrix.json"):  # metrics first, as save_results does
        storage.remove(storage.join(paths.outputs, name))


def train(config: Config, run_dir: str) -> dict:
    """Trains `config.model` on RUN/data and writes RUN/train/. Returns metrics.json's content."""
    return Trainer(config, run_dir).run()


def make_callbacks(config: TrainConfig, paths: TrainPaths, has_validation: bool):
    timer = ThroughputTimer()
    monitor = config.monitor if has_validation or not config.monitor.startswith("val_") else config.monitor[4:]
    if monitor != config.monitor:  # said once: otherwise early stopping on a falling train metric looks like a bug
        watched = ["the best checkpoint"] + (["early stopping"] if config.early_stopping_patience else []) \
            + (["plateau"] if config.schedule == "plateau" else [])
        watching = " and ".join([", ".join(watched[:-1]), watched[-1]] if len(watched) > 1 else watched) \
            + (" monitor" if len(watched) > 1 else " monitors")
        if config.include_validation:  # asked for: the final run after tuning
            log.info("train: no separate validation data (train.include_validation): %s `%s` on the "
                     "training data instead of train.monitor `%s`", watching, monitor, config.monitor)
        else:
            log.warning("train: no validation split (RUN/data holds 0 validation examples; see data.split): %s "
                        "`%s` on the training data instead of train.monitor `%s`", watching, monitor,
                        config.monitor)
    callbacks = [
        StopOnNonFiniteLoss(),  # first: a NaN batch raises before any other callback saves or logs it
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
