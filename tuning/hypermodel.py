"""The hypermodel over the trainer's entry, and the tuner that runs its trials.

A trial's hyperparameters become a config (tuning.space); the trainer's `Trainer` builds,
compiles and fits that config exactly as `kcp train` does. No model, optimizer or input
code lives here. Each trial's seconds and resident memory go to a file of their own.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time

import keras
import keras_tuner as kt

from kcp.core import storage
from kcp.core.cluster import is_tuner_worker, tuner_id
from kcp.core.config import Config
from trainer.train import Trainer
from tuning import compat
from tuning.space import hyperparameter, trial_config
from tuning.workers import heartbeat

log = logging.getLogger("kcp.tune")
TRIAL_STATS = "trial_stats"  # one JSON file per trial: workers sharing the run directory never race on one file
EPOCH_END, TRIAL_END = "epoch", "trial-end"  # fault points (KCP_KILL_AT=after:epoch:N, after:trial-end:N)
TUNERS = {"random": kt.RandomSearch, "grid": kt.GridSearch, "bayesian": kt.BayesianOptimization,
          "hyperband": kt.Hyperband}


class ObjectiveNotLogged(kt.errors.FatalValueError):
    """`tune.objective` is not among the training's logs: no trial could ever be scored. Keras
    Tuner re-raises a FatalError out of `search` instead of failing the trial and going on."""


class CheckObjectiveLogged(keras.callbacks.Callback):
    """Stops the search at the end of the first epoch whose logs lack `tune.objective` (a typo, or
    a metric this model does not compute), naming what the training does log. Without it every
    trial trained in full and then failed in Keras Tuner with a KeyError, and the search ended
    with no scored trial."""

    def __init__(self, objective: str):
        super().__init__()
        self.objective = objective

    def on_epoch_end(self, epoch, logs=None):
        if self.objective not in (logs or {}):
            logged = ", ".join(sorted(logs or {})) or "nothing"
            raise ObjectiveNotLogged(f"tune.objective: {self.objective!r} is not logged by the training, which logs "
                                     f"{logged}")


class TrainerHyperModel(kt.HyperModel):
    """`build(hp)`: the trial's config, built and compiled by the trainer; `fit(hp, model, ...)`:
    the trainer's fit on the contract's splits, with Keras Tuner's callbacks and its fit
    arguments (Hyperband's epochs and initial_epoch) and the tuning early stopping."""

    def __init__(self, config: Config, run_dir: str, space: dict):
        super().__init__()
        self.config, self.run_dir, self.space = config, run_dir, space
        self._trainer = None  # the current trial's: its build and fit share one

    def trainer(self, hp) -> Trainer:
        values = {key: hyperparameter(hp, key, spec) for key, spec in self.space.items()}
        # a trial is scored on the validation split, so it never fits on it
        trial = trial_config(self.config, {**values, "train.include_validation": False}, self.space)
        if self._trainer is None or self._trainer.config != trial:
            self._trainer = Trainer(trial, self.run_dir)
        return self._trainer

    def build(self, hp):
        # Every trial starts from the same seeds (weights, shuffles, dropout), so its score depends
        # on its hyperparameters only: not on the trials this process ran before it (a resumed
        # search re-runs a killed trial as its first, and gets the score an uninterrupted search gets).
        keras.utils.set_random_seed(self.config.train.seed)
        trainer = self.trainer(hp)
        model = trainer.build()
        # The optimizer's variables now, not at the first step: Hyperband continues a trial of an
        # earlier bracket by `load_weights` of its checkpoint, which restores the optimizer (moments,
        # step count, so the learning-rate schedule goes on where it stopped) only into an optimizer
        # that has them; otherwise Keras skips it with a warning and the trial restarts its warmup.
        with trainer.strategy.scope():
            model.optimizer.build(model.trainable_variables)
        return model

    def fit(self, hp, model, *args, **kwargs):
        if args:
            raise TypeError("TrainerHyperModel.fit: the data comes from the run's contract, not from search()")
        tune = self.config.tune
        # first (after the trainer's language metrics, which it puts before all): before Keras Tuner's
        # callback and early stopping look for the objective
        callbacks = [CheckObjectiveLogged(tune.objective), *kwargs.pop("callbacks", [])]
        if tune.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor=tune.objective, mode=tune.direction,
                                                           patience=tune.early_stopping_patience,
                                                           restore_best_weights=True))
        if tune.algorithm != "hyperband":  # the trial's own train.epochs (searched, or the config's), not
            kwargs.pop("epochs", None)      # search()'s: hyperband alone gives each trial its epochs
        return self.trainer(hp).fit(model, callbacks, **kwargs)


def trial_stats_path(directory: str, trial_id: str) -> str:
    return storage.join(directory, TRIAL_STATS, f"{trial_id}.json")


def write_trial_stats(directory: str, trial_id: str, measured: dict) -> None:
    storage.write_text_atomic(trial_stats_path(directory, trial_id), json.dumps(measured))


def read_trial_stats(directory: str) -> dict:
    """{trial_id: {"seconds": …, "rss_mb": …}} for every trial whose figures were written."""
    paths = storage.glob(storage.join(directory, TRIAL_STATS, "*.json"))
    return {path.rsplit("/", 1)[-1][:-len(".json")]: json.loads(storage.read_text(path)) for path in paths}


def resident_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def said_trial_end(oracle, trial, objective: str, seconds: float) -> None:
    """One log line a trial, from the process that ran it (a worker, in a distributed search): its
    score (or why it has none), and the best so far. A search of an hour said nothing between its
    first line and its result. The score is the oracle's: a worker's own copy of the trial is
    scored on the chief."""
    try:
        trial = oracle.get_trial(trial.trial_id) or trial
        best = oracle.get_best_trials(1)
    except Exception:  # noqa: BLE001  a chief gone: the worker's own watchdog says so
        best = []
    leader = f"; best so far {best[0].score:.4f} (trial {best[0].trial_id})" if best and best[0].score is not None \
        else ""
    if trial.score is None:
        why = (getattr(trial, "message", None) or "").strip().splitlines()
        log.info("tune: trial %s ended without a score (%s%s) in %.0f s%s", trial.trial_id, trial.status,
                 f": {why[-1][:200]}" if why else "", seconds, leader)
    else:
        log.info("tune: trial %s: %s %.4f in %.0f s%s", trial.trial_id, objective, trial.score, seconds, leader)


def make_tuner(config: Config, hypermodel, directory: str):
    """The `tune.algorithm` tuner over `hypermodel`, its project in DIRECTORY/search (resumed if there)."""
    compat.patch_keras_tuner_atomic_json()
    compat.patch_keras_tuner_resume_completed()
    tune = config.tune
    common = dict(objective=kt.Objective(tune.objective, direction=tune.direction),
                  executions_per_trial=tune.executions_per_trial, directory=directory, project_name="search",
                  overwrite=False, seed=config.train.seed)

    class TimedTuner(TUNERS[tune.algorithm]):
        """Times each trial, records the process's RSS after it, and releases the Keras session
        between trials, so trials in one process do not grow its memory.

        A trial's figures go to their own file before Keras Tuner records the trial as ended,
        so a chief that sees the last trial end already sees every worker's figures. A
        process killed between the two re-runs that trial on resume and rewrites its figures.

        The fault-injection suite kills it at the end of an epoch (KCP_KILL_AT="after:epoch:N",
        the N-th epoch this process finishes, inside a trial) and after a trial was recorded
        ("after:trial-end:N", between trials)."""

        def run_trial(self, trial, *args, **kwargs):
            started = time.perf_counter()
            beating = (heartbeat(self.oracle, trial.trial_id) if is_tuner_worker()
                       else contextlib.nullcontext())  # the chief hears from this worker while it trains
            try:
                with beating:
                    return super().run_trial(trial, *args, **kwargs)
            finally:
                measured = {"seconds": time.perf_counter() - started, "rss_mb": resident_mb()}
                write_trial_stats(directory, trial.trial_id, measured)
                self.seconds = measured["seconds"]

        def on_epoch_end(self, trial, model, epoch, logs=None):
            super().on_epoch_end(trial, model, epoch, logs=logs)
            storage.fault_point("after", EPOCH_END)  # the fault suite's kill inside a trial

        def on_trial_end(self, trial):
            super().on_trial_end(trial)  # the oracle has scored it now
            said_trial_end(self.oracle, trial, tune.objective, getattr(self, "seconds", 0.0))
            keras.backend.clear_session()
            gc.collect()
            storage.fault_point("after", TRIAL_END)  # between trials: this one recorded, the next not begun

    tuner = (TimedTuner(hypermodel, max_epochs=config.train.epochs, factor=3, **common)
             if tune.algorithm == "hyperband" else TimedTuner(hypermodel, max_trials=tune.max_trials, **common))
    if tuner_id() and not is_tuner_worker():  # the chief of a distributed search: its workers run the trials
        said_by_chief(tuner.oracle, tune.objective, directory)
    return tuner


def said_by_chief(oracle, objective: str, directory: str) -> None:
    """The chief's oracle logs each trial a worker ends, as the worker does (`said_trial_end`, with
    the seconds the worker wrote before ending it): the chief, the process a user watches, said
    nothing between its first line and its result."""
    end_trial = oracle.end_trial

    def ended(trial):
        result = end_trial(trial)
        path = trial_stats_path(directory, trial.trial_id)  # this trial's file alone, not every trial's
        seconds = json.loads(storage.read_text(path))["seconds"] if storage.exists(path) else 0
        said_trial_end(oracle, trial, objective, seconds)
        return result

    oracle.end_trial = ended
