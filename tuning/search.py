"""Hyperparameter search with Keras Tuner over the trainer's own configs.

    kcp tune --run-dir runs/digits --set tune.algorithm=bayesian --set tune.max_trials=10

A search space maps dotted config keys to hyperparameters (YAML under `tune.space`):

    tune:
      space:
        model.depth: [20, 32]                                        # hp.Choice
        train.learning_rate: {min: 1.0e-4, max: 1.0e-1, sampling: log}  # hp.Float
        model.units: {min: 32, max: 256, step: 32}                   # hp.Int
        model.dropout: {min: 0.0, max: 0.5, step: 0.1}               # hp.Float

The hypermodel turns a trial's values into a trainer config and calls the trainer's model
registry and optimizer: no model code lives here. Results go to RUN/tuning/: the tuner's
project folder (resumable), trials.csv, best_hparams.json, best_config.yaml (accepted by
`kcp train --config`) and trials.png.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import os
import time

from kcp.core import storage
from kcp.core.config import Config, ConfigError, load_config
from kcp.core import contract as contract_lib
from kcp.core.layout import RunLayout

log = logging.getLogger("kcp.tune")

DEFAULT_SPACES = {
    "cnn": {"model.kernel_size": [3, 5], "model.dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
            "train.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}},
    "resnet": {"model.depth": [20, 32], "model.version": [1, 2],
               "train.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}},
    "rnn": {"model.cell": ["lstm", "gru"], "model.units": [64, 128], "model.bidirectional": [False, True],
            "train.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}},
    "transformer": {"model.layers": [1, 2], "model.heads": [2, 4], "model.dim": [32, 64],
                    "train.learning_rate": {"min": 1e-4, "max": 3e-3, "sampling": "log"}},
}


def search_space(config: Config) -> dict:
    """`tune.space`, or the family's default space; every key checked against the config."""
    space = dict(config.tune.space) if config.tune.space else DEFAULT_SPACES[config.model.name]
    plain = config.to_dict()
    for key, spec in space.items():
        section, _, name = key.partition(".")
        if section not in ("data", "model", "train") or name not in plain.get(section, {}):
            raise ConfigError(f"tune.space: {key!r} is not a data, model or train key")
        if isinstance(spec, list):
            if not spec or any(isinstance(v, (list, dict)) for v in spec):
                raise ConfigError(f"tune.space.{key}: a choice needs a non-empty list of plain values")
        elif isinstance(spec, dict):
            unknown = set(spec) - {"min", "max", "step", "sampling"}
            if unknown or "min" not in spec or "max" not in spec:
                raise ConfigError(f"tune.space.{key}: a range needs min and max (and optionally step, sampling)")
            if spec["min"] >= spec["max"]:
                raise ConfigError(f"tune.space.{key}: min {spec['min']} must be below max {spec['max']}")
            if spec.get("sampling", "linear") not in ("linear", "log", "reverse_log"):
                raise ConfigError(f"tune.space.{key}: sampling must be linear, log or reverse_log")
        else:
            raise ConfigError(f"tune.space.{key}: expected a list of choices or a {{min, max}} range")
        # every value must also be a valid config value: fail before the first trial
        for value in (spec if isinstance(spec, list) else [spec["min"], spec["max"]]):
            load_config([plain], [f"{key}={json.dumps(value)}"])
    return space


def hyperparameter(hp, key: str, spec):
    """One config key's hyperparameter: Choice for lists, Int or Float for ranges."""
    if isinstance(spec, list):
        return hp.Choice(key, spec)
    sampling = spec.get("sampling", "linear")
    if all(isinstance(spec.get(k, 1), int) and not isinstance(spec.get(k, 1), bool) for k in ("min", "max", "step")):
        return hp.Int(key, spec["min"], spec["max"], step=spec.get("step", 1), sampling=sampling)
    return hp.Float(key, float(spec["min"]), float(spec["max"]), step=spec.get("step"), sampling=sampling)


def native(value, spec):
    """A hyperparameter value as the config wants it: Python types, and bools kept bools
    (Keras Tuner hands boolean choices back as 0/1 in some algorithms)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(spec, list) and spec and all(isinstance(choice, bool) for choice in spec):
        return bool(value)
    return value


def trial_config(config: Config, values: dict, space: dict | None = None) -> Config:
    """The base config with a trial's values applied (validated like --set)."""
    space = space or {}
    return load_config([config.to_dict()], [f"{key}={json.dumps(native(value, space.get(key)))}"
                                            for key, value in values.items()])


def make_hypermodel(config: Config, run_dir: str, space: dict):
    import keras
    import keras_tuner as kt

    from trainer.callbacks import learning_rate, steps_per_epoch
    from trainer.data import make_dataset
    from trainer.models import ModelInputs, build_model
    from trainer.train import loss_and_metrics, make_optimizer

    contract = contract_lib.read_contract(run_dir)
    data_dir = contract_lib.data_dir(run_dir)
    vectorizer = contract_lib.text_vectorizer(contract, run_dir) if contract.modality == "text" else None

    class TrainerHyperModel(kt.HyperModel):
        """Builds the trainer's model for a trial; fits on the contract's train/validation splits."""

        def build(self, hp):
            values = {key: hyperparameter(hp, key, spec) for key, spec in space.items()}
            trial = trial_config(config, values, space)
            loss, metrics, _ = loss_and_metrics(trial.train, contract.num_classes)
            steps = steps_per_epoch(contract.splits["train"].count, trial.train.batch_size, False)
            model = build_model(ModelInputs.from_contract(contract), trial.model)
            model.compile(make_optimizer(trial.train, learning_rate(trial.train, steps)), loss=loss, metrics=metrics)
            return model

        def fit(self, hp, model, *args, **kwargs):
            trial = trial_config(config, {key: hp.get(key) for key in space}, space)
            one_hot = trial.train.label_smoothing > 0

            def dataset(split, training):
                return make_dataset(contract, data_dir, split, trial.train, global_batch=trial.train.batch_size,
                                    training=training, one_hot=one_hot, vectorizer=vectorizer)

            callbacks = list(kwargs.pop("callbacks", []))
            if config.tune.early_stopping_patience:
                callbacks.append(keras.callbacks.EarlyStopping(
                    monitor=config.tune.objective, mode=config.tune.direction,
                    patience=config.tune.early_stopping_patience, restore_best_weights=True))
            return model.fit(dataset("train", True), validation_data=dataset("validation", False),
                             callbacks=callbacks, shuffle=False, **kwargs)

    return TrainerHyperModel()


TRIAL_STATS = "trial_stats"  # one JSON file per trial: workers sharing the run directory never race on one file


def write_trial_stats(directory: str, trial_id: str, measured: dict) -> None:
    storage.write_text_atomic(storage.join(directory, TRIAL_STATS, f"{trial_id}.json"), json.dumps(measured))


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


def make_tuner(config: Config, run_dir: str, hypermodel, directory: str):
    import keras
    import keras_tuner as kt

    from trainer import compat

    compat.patch_keras_tuner_atomic_json()
    tune = config.tune
    objective = kt.Objective(tune.objective, direction=tune.direction)
    common = dict(objective=objective, executions_per_trial=tune.executions_per_trial, directory=directory,
                  project_name="search", overwrite=False, seed=config.train.seed)
    classes = {"random": kt.RandomSearch, "grid": kt.GridSearch, "bayesian": kt.BayesianOptimization,
               "hyperband": kt.Hyperband}
    base = classes[tune.algorithm]
    stats_directory = directory

    class TimedTuner(base):
        """Times each trial, records the process's RSS after it, and releases the Keras session
        between trials, so trials in one process do not grow its memory.

        A trial's figures go to their own file before Keras Tuner records the trial as ended,
        so a chief that sees the last trial end already sees every worker's figures. A
        process killed between the two re-runs that trial on resume and rewrites its figures."""

        def run_trial(self, trial, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().run_trial(trial, *args, **kwargs)
            finally:
                measured = {"seconds": time.perf_counter() - started, "rss_mb": resident_mb()}
                write_trial_stats(stats_directory, trial.trial_id, measured)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            keras.backend.clear_session()
            gc.collect()

    if tune.algorithm == "hyperband":
        return TimedTuner(hypermodel, max_epochs=config.train.epochs, factor=3, **common)
    return TimedTuner(hypermodel, max_trials=tune.max_trials, **common)


def figures(measured: dict | None) -> list[str]:
    """A trial's seconds and RSS for trials.csv; empty where the process died before it wrote them."""
    if not measured:
        return ["", ""]
    return [f"{measured['seconds']:.1f}", f"{measured['rss_mb']:.0f}"]


def write_results(tuner, config: Config, run_dir: str, space: dict) -> dict:
    """trials.csv, best_hparams.json, best_config.yaml and trials.png under RUN/tuning/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = RunLayout(run_dir).tuning
    stats = read_trial_stats(directory)
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id)
    keys = list(space)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", *keys, config.tune.objective, "status", "seconds", "rss_mb"])
    scores = []
    for trial in trials:
        score = trial.score
        scores.append(score)
        writer.writerow([trial.trial_id, *[native(trial.hyperparameters.values.get(k, ""), space[k]) for k in keys],
                         "" if score is None else f"{score:.6f}", trial.status,
                         *figures(stats.get(trial.trial_id))])
    storage.write_text_atomic(storage.join(directory, "trials.csv"), buffer.getvalue())

    best = tuner.oracle.get_best_trials(1)
    result = {"trials": len(trials), "completed": sum(1 for t in trials if t.status == "COMPLETED")}
    if best:
        values = {k: native(best[0].hyperparameters.values[k], space[k]) for k in keys
                  if k in best[0].hyperparameters.values}
        result.update({"best_trial": best[0].trial_id, "objective": config.tune.objective,
                       "best_score": best[0].score, "hyperparameters": values})
        storage.write_text_atomic(storage.join(directory, "best_hparams.json"), json.dumps(result, indent=2) + "\n")
        storage.write_text_atomic(storage.join(directory, "best_config.yaml"), trial_config(config, values, space).to_yaml())

    figure, axis = plt.subplots(figsize=(7, 3.5))
    indices = [i for i, s in enumerate(scores, start=1) if s is not None]
    values = [s for s in scores if s is not None]
    axis.plot(indices, values, "o", label=config.tune.objective)
    running = []
    for value in values:
        pick = max if config.tune.direction == "max" else min
        running.append(value if not running else pick(running[-1], value))
    axis.step(indices, running, where="post", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel(config.tune.objective)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes_atomic(storage.join(directory, "trials.png"), png.getvalue())
    return result


CHIEF_GONE_SECONDS = 30


def watch_chief(host: str, port: int, grace_seconds: float = CHIEF_GONE_SECONDS, interval: float = 2.0) -> None:
    """Ends this worker process (exit 0) once the chief has been unreachable for `grace_seconds`.

    Keras Tuner's client waits for the chief with no deadline, so without this a worker whose
    chief died would hang forever. Its finished trials are already with the chief's oracle.
    """
    import socket
    import threading

    def watch():
        last_seen = time.monotonic()
        while True:
            try:
                socket.create_connection((host, port), timeout=interval).close()
                last_seen = time.monotonic()
            except OSError:
                if time.monotonic() - last_seen > grace_seconds:
                    log.warning("tune: the chief at %s:%d is gone; this worker stops", host, port)
                    logging.shutdown()
                    os._exit(0)  # noqa: SLF001  the search thread is blocked inside grpc
            time.sleep(interval)

    threading.Thread(target=watch, name="chief-watchdog", daemon=True).start()


def run_search(config: Config, run_dir: str) -> dict:
    """Runs (or resumes) the search; the chief of a distributed search only serves the oracle."""
    import keras

    space = search_space(config)
    directory = RunLayout(run_dir).tuning
    storage.makedirs(directory)
    keras.utils.set_random_seed(config.train.seed)
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "")
    worker = bool(tuner_id) and "chief" not in tuner_id
    if worker:
        watch_chief(os.environ["KERASTUNER_ORACLE_IP"], int(os.environ["KERASTUNER_ORACLE_PORT"]))
    tuner = make_tuner(config, run_dir, make_hypermodel(config, run_dir, space), directory)
    tuner.search(epochs=config.train.epochs, verbose=0)
    if worker:  # a worker holds only a client of the chief's oracle: the chief writes the results
        return {"role": tuner_id}
    return write_results(tuner, config, run_dir, space)


def retrain_best(config: Config, run_dir: str) -> dict:
    """Trains the best trial's config on train + validation (RUN/train/) and exports it."""
    from deploy.export import export_for_serving
    from trainer.train import train

    best_path = RunLayout(run_dir).best_hparams
    if not storage.exists(best_path):
        raise ConfigError(f"tune.retrain_best: {best_path} does not exist; no trial completed")
    best = json.loads(storage.read_text(best_path))
    final = load_config([trial_config(config, best["hyperparameters"]).to_dict()], ["train.include_validation=true"])
    metrics = train(final, run_dir)
    return {"test": metrics.get("test", {}), "export_dir": export_for_serving(final, run_dir)}
