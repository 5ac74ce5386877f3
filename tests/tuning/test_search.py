"""Keras Tuner search over the trainer's configs: algorithms, results, grid, distributed, resume."""

import csv
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import pytest
import yaml

from kcp import cli
from kcp.core.config import ConfigError
from kcp.core.config_load import load_config
from tests.conftest import fresh_run
from tests.gcs import free_port
from tuning.hypermodel import TrainerHyperModel, read_trial_stats
from tuning.results import best_config, figures
from tuning.search import run_search
from tuning.space import hyperparameter, search_space

SMALL = ["model.filters=[8]", "train.epochs=2", "tune.early_stopping_patience=0"]
QUIET = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def read_trials(run_dir):
    with open(os.path.join(run_dir, "tuning", "trials.csv")) as handle:
        return list(csv.DictReader(handle))


def assert_results(run_dir, result, keys):
    """trials.csv, best_hparams.json, trials.png and best_config.yaml agree with the search's result."""
    trials = read_trials(run_dir)
    assert all(t["status"] == "COMPLETED" and 0 < float(t["val_accuracy"]) <= 1 for t in trials)
    assert all(float(t["seconds"]) > 0 for t in trials)
    tuning = os.path.join(run_dir, "tuning")
    best = json.load(open(os.path.join(tuning, "best_hparams.json")))
    assert best["best_score"] == pytest.approx(max(float(t["val_accuracy"]) for t in trials), abs=1e-6)
    assert best["best_score"] == result["best_score"] and type(result["best_score"]) is float  # not np.float64
    assert set(best["hyperparameters"]) == keys
    assert os.path.getsize(os.path.join(tuning, "trials.png")) > 5000
    from kcp.core.config import read_yaml_file

    best_config = load_config([read_yaml_file(os.path.join(tuning, "best_config.yaml"))])  # `kcp train --config` takes it
    assert best_config.model.kernel_size == best["hyperparameters"]["model.kernel_size"]
    return trials


@pytest.mark.parametrize("algorithm", ["random", "bayesian", "hyperband"])  # grid: the next test
def test_each_algorithm_runs_and_writes_its_results(digits_data, tmp_path, algorithm, caplog):
    run_dir = fresh_run(digits_data, tmp_path)
    epochs = ["train.epochs=3"] if algorithm == "hyperband" else []  # its brackets come from max epochs
    config = load_config([], [*SMALL, *epochs, f"tune.algorithm={algorithm}", "tune.max_trials=2",
                              "tune.space={train.learning_rate: {min: 1.0e-3, max: 1.0e-2, sampling: log}, "
                              "model.kernel_size: [3, 5]}"])
    with caplog.at_level("INFO", logger="kcp.tune"):
        trials = assert_results(run_dir, run_search(config, run_dir), {"train.learning_rate", "model.kernel_size"})
    assert len(trials) >= 3 if algorithm == "hyperband" else len(trials) == 2
    said = [record.getMessage() for record in caplog.records if record.getMessage().startswith("tune: trial ")]
    assert len(said) == len(trials)  # one line a trial, as it ends, with its score and the best so far
    best = max(float(t["val_accuracy"]) for t in trials)
    leader = re.findall(r"; best so far ([0-9.]+) \(trial ", said[-1])
    assert leader and float(leader[0]) == pytest.approx(best, abs=1e-4)
    for trial in trials:
        logged = [float(found) for line in said
                  for found in re.findall(rf"^tune: trial {trial['trial_id']}: val_accuracy ([0-9.]+) in ", line)]
        assert len(logged) == 1 and logged[0] == pytest.approx(float(trial["val_accuracy"]), abs=1e-4), said
    if algorithm == "hyperband":
        assert_continued_trials_resume_their_optimizer(config, run_dir)


def assert_continued_trials_resume_their_optimizer(config, run_dir):
    """Hyperband continues a trial of an earlier bracket from its checkpoint: the weights and the
    optimizer (moments, and the step count that drives the learning-rate schedule), not the weights
    under a fresh optimizer that starts its warmup again."""
    import warnings

    from tuning.hypermodel import make_tuner

    tuner = make_tuner(config, TrainerHyperModel(config, run_dir, search_space(config)),
                       os.path.join(run_dir, "tuning"))
    continued = [t for t in tuner.oracle.trials.values() if "tuner/trial_id" in t.hyperparameters.values]
    assert continued
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tuner._build_hypermodel(continued[0].hyperparameters)
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert int(model.optimizer.iterations.numpy()) > 0  # where the earlier bracket's best epoch stopped
    moments = [v for v in model.optimizer.variables if "momentum" in v.path]
    assert moments and any(float(abs(v).numpy().max()) > 0 for v in moments)


def test_grid_enumerates_exactly_its_grid_and_writes_its_results(digits_data, tmp_path):
    run_dir = fresh_run(digits_data, tmp_path)
    config = load_config([], [*SMALL, "tune.algorithm=grid", "tune.max_trials=20",
                              "tune.space={model.kernel_size: [3, 5], model.batch_norm: [true, false]}"])
    trials = assert_results(run_dir, run_search(config, run_dir), {"model.kernel_size", "model.batch_norm"})
    combos = sorted((t["model.kernel_size"], t["model.batch_norm"]) for t in trials)
    assert combos == [("3", "False"), ("3", "True"), ("5", "False"), ("5", "True")]


@pytest.mark.parametrize("space, message", [
    ("{model.nope: [1, 2]}", "tune.space: model.nope: not a key of the rnn family; allowed: name, "),
    ("{model.depth: [8, 14]}", "tune.space: model.depth: not a key of the rnn family"),  # resnet's
    ("{nope.depth: [8, 14]}", "tune.space: 'nope.depth' is not a model or train key"),
    ("{data.seed: [1, 2]}", "tune.space: 'data.seed' is fixed by the preprocessed data .RUN/data., which a trial "),
    ("{train.epochs: [0, 1]}", "tune.space: train.epochs: 0 is below the minimum 1"),
    ("{model.augment.zoom: [0.0, 1.5]}", "tune.space: model.augment.zoom: 1.5 is above the maximum"),
    ("{train.learning_rate: {min: 0.1}}", "tune.space.train.learning_rate: a range needs min and max"),
    ("{train.learning_rate: {min: 0.1, max: 0.01}}", "min 0.1 must be below max 0.01"),
    ("{model.cell: [lstm, nope]}", "model.cell: 'nope' is not one of simple, lstm, gru"),
    ("{model.units: 64}", "expected a list of choices or a {min, max} range"),
    # bad numbers: each a one-line ConfigError naming the key and the value, not a traceback or a trial's crash
    ("{train.learning_rate: {min: 0.001, max: 0.1, step: 0}}", "tune.space.train.learning_rate: step 0 must be above 0"),
    ("{train.learning_rate: {min: 0.001, max: 0.1, step: -0.01}}", "train.learning_rate: step -0.01 must be above 0"),
    ("{train.learning_rate: {min: 0.001, max: x}}", "tune.space.train.learning_rate: max 'x' must be a number"),
    ("{train.learning_rate: {min: 0.001, max: 0.1, step: x}}", "train.learning_rate: step 'x' must be a number"),
    ("{train.learning_rate: {min: true, max: 0.1}}", "train.learning_rate: min True must be a number"),
    ("{train.learning_rate: {min: 0.001, max: .inf}}", "train.learning_rate: max inf must be a finite number"),
    ("{train.learning_rate: {min: 0.001, max: 0.1, foo: 1}}",
     "tune.space.train.learning_rate: unknown key 'foo' in a range; a range takes min, max, step, sampling"),
    ("{train.learning_rate: {min: 0.0, max: 0.1, sampling: log}}", "min 0.0 must be above 0 with sampling log"),
    ("{train.learning_rate: {min: 0.001, max: 0.1, step: 0.5, sampling: log}}", "step 0.5 must be above 1"),
    ("{train.learning_rate: {min: 0.001, max: 0.1, sampling: cubic}}", "sampling 'cubic' must be linear, log"),
    ("{train.learning_rate: [0.1, 0.1]}", "tune.space.train.learning_rate: choice 0.1 is listed twice"),
    ("{model.cell: [lstm, gru, lstm]}", "tune.space.model.cell: choice 'lstm' is listed twice"),
    ("{train.learning_rate: [1, 0.1]}", "learning_rate: choices .1, 0.1. mix float and int values"),
    ("{train.learning_rate: [null, 0.1]}", "train.learning_rate: choice None is not a number, string or boolean"),
])
def test_bad_search_spaces_fail_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message.replace("{", "\\{").replace("}", "\\}")):
        search_space(load_config([], ["model.name=rnn", f"tune.space={space}"]))  # rnn: model.cell, model.units


def test_a_space_is_checked_combination_by_combination_and_takes_nested_keys():
    config = load_config([], ["model.name=transformer", "tune.space={model.heads: [2, 16], model.dim: [16, 24]}"])
    with pytest.raises(ConfigError, match=r"^tune.space: model.dim: 24 is not divisible by model.heads \(16\) "
                                          r"\(with model.heads=16, model.dim=24\)$"):
        search_space(config)  # each value alone is valid; one pair is not
    assert search_space(load_config([], ["tune.space={model.augment.zoom: [0.0, 0.1]}"]))
    # every pairing valid, though model.heads 3 does not divide the base model.dim (64) no trial uses
    assert search_space(load_config([], ["model.name=transformer",
                                         "tune.space={model.heads: [3, 6], model.dim: [48, 96]}"]))
    with pytest.raises(ConfigError, match=r"^tune.objective: empty; name a metric"):
        load_config([], ["tune.objective="])
    # a later layer's space replaces an earlier one's, not adds to it
    recorded = load_config([], ["tune.space={model.dropout: [0.1, 0.2]}"]).to_dict()
    again = load_config([], ["tune.space={model.kernel_size: [3, 5]}"], base=recorded)
    assert again.tune.space == {"model.kernel_size": [3, 5]}


def test_each_family_has_a_valid_default_space():
    for family in ("cnn", "resnet", "rnn", "transformer", "gpt"):
        assert search_space(load_config([], [f"model.name={family}"]))


def test_ranges_become_keras_tuner_hyperparameters():
    """Integer bounds without a step take every integer (linear) or any factor (log: Keras Tuner
    refuses step 1 there); a null step is no step."""
    hp = kt.HyperParameters()
    space = {"train.batch_size": {"min": 16, "max": 128, "sampling": "log"},
             "model.units": {"min": 32, "max": 256, "step": 32},
             "train.learning_rate": {"min": 1e-3, "max": 1e-1, "step": None}}
    search_space(load_config([], ["model.name=rnn", f"tune.space={json.dumps(space)}"]))
    for key, spec in space.items():
        hyperparameter(hp, key, spec)
    batch, units, rate = (hp._hps[key][0] for key in space)  # noqa: SLF001
    assert (type(batch).__name__, batch.step, batch.sampling) == ("Int", None, "log")
    assert (type(units).__name__, units.step) == ("Int", 32)
    assert (type(rate).__name__, rate.step) == ("Float", None)


def tune_process(run_dir, *extra):
    argv = [sys.executable, "-m", "tuning.task", "--run-dir", run_dir]
    for override in (*SMALL, "tune.algorithm=random", "tune.max_trials=6",
                     "tune.space={train.learning_rate: {min: 1.0e-4, max: 1.0e-1, sampling: log}}"):
        argv += ["--set", override]
    return subprocess.Popen([*argv, *extra], env=QUIET, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_chief_and_two_workers_run_each_trial_once_and_exit(digits_data, tmp_path):
    run_dir = fresh_run(digits_data, tmp_path)
    oracle = f"127.0.0.1:{free_port()}"
    trials_4 = ["--set", "tune.max_trials=4"]  # two per worker
    chief = tune_process(run_dir, "--role", "chief", "--oracle", oracle, *trials_4)
    time.sleep(3)
    # any id without "chief" is a worker, sharing the chief's run directory (its lock): kcp's naming and
    # Keras Tuner's own (`tuner1`)
    workers = [tune_process(run_dir, "--role", "worker", "--oracle", oracle, "--tuner-id", tuner, *trials_4)
               for tuner in ("worker0", "tuner1")]
    outputs = [process.communicate(timeout=600)[0] for process in (*workers, chief)]
    finished = time.time()
    for process, output in zip((*workers, chief), outputs):
        assert process.returncode == 0, output[-3000:]
    # the start lines: the chief says how many trials it runs; a worker runs what the chief gives it
    assert f"[tune] random over cnn as chief of {oracle}, 4 trials\n" in outputs[2]
    assert f"[tune] random over cnn as worker0 of {oracle} (the chief sets the trials)\n" in outputs[0]
    trials = read_trials(run_dir)
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4
    assert all(t["status"] == "COMPLETED" for t in trials)
    # each trial's line, with the chief's score, from the worker that ran it (its own copy has none),
    # and from the chief, the process a user watches
    for said in ("".join(outputs[:2]), outputs[2]):
        for trial in trials:
            logged = re.findall(rf"tune: trial {trial['trial_id']}: val_accuracy ([0-9.]+) in ([0-9]+) s", said)
            assert len(logged) == 1, said
            assert float(logged[0][0]) == pytest.approx(float(trial["val_accuracy"]), abs=1e-4)
            assert abs(int(logged[0][1]) - float(trial["seconds"])) <= 0.55  # "%.0f" against "%.1f" of one figure
        assert "ended without a score" not in said
    stats = read_trial_stats(os.path.join(run_dir, "tuning"))
    assert sorted(stats) == sorted(t["trial_id"] for t in trials)  # no worker's figures lost to another's
    assert all(float(t["seconds"]) > 0 for t in trials)
    last_trial = max(os.path.getmtime(path) for path in glob.glob(os.path.join(run_dir, "tuning", "trial_stats", "*")))
    assert finished - last_trial < 60


def test_a_tf_config_cluster_alone_makes_a_chief_and_workers(digits_data, tmp_path):
    """As a Vertex AI custom job starts `python -m tuning.task` on every replica with only TF_CONFIG
    (no --role, no KERASTUNER_* variables): the chief task serves the oracle on its TF_CONFIG address,
    the workers share the trials; none runs a search of its own. With tune.retrain_best and
    AIP_MODEL_DIR, the chief retrains the best config once the trials are done, and hands that export
    over (it used to skip the retrain and hand over whatever export was newest, or fail on none)."""
    run_dir = fresh_run(digits_data, tmp_path)
    cluster = {"chief": [f"127.0.0.1:{free_port()}"], "worker": [f"127.0.0.1:{free_port()}"]}
    argv = [sys.executable, "-m", "tuning.task", "--job-dir", run_dir]
    for override in (*SMALL, "tune.algorithm=random", "tune.max_trials=3", "tune.retrain_best=true",
                     "tune.space={train.learning_rate: {min: 1.0e-4, max: 1.0e-1, sampling: log}}"):
        argv += ["--set", override]
    processes, model_dir = [], str(tmp_path / "aip-model")
    for task in ({"type": "chief", "index": 0}, {"type": "worker", "index": 0}):
        env = {**QUIET, "TF_CONFIG": json.dumps({"cluster": cluster, "task": task}), "AIP_MODEL_DIR": model_dir}
        processes.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(2)
    chief, worker = (process.communicate(timeout=600)[0] for process in processes)
    assert [process.returncode for process in processes] == [0, 0], chief[-3000:] + worker[-3000:]
    assert f"[tune] random over cnn as chief of {cluster['chief'][0]}, 3 trials\n" in chief
    assert f"[tune] random over cnn as worker-0 of {cluster['chief'][0]} (the chief sets the trials)\n" in worker
    trials = read_trials(run_dir)
    assert len(trials) == 3 and all(t["status"] == "COMPLETED" for t in trials)  # 3, not 3 per replica
    assert sorted(read_trial_stats(os.path.join(run_dir, "tuning"))) == sorted(t["trial_id"] for t in trials)
    export_dir = os.path.join(run_dir, "export", "model", "1")  # the chief's retrain, the only export
    assert f"[tune] retrained the best config on train + validation, exported to {export_dir}" in chief
    assert f"[export] {export_dir} -> {model_dir} (AIP_MODEL_DIR)" in chief and "retrained" not in worker
    retrained = json.load(open(os.path.join(run_dir, "tuning", "retrained.json")))
    assert retrained["export_dir"] == export_dir and os.path.exists(os.path.join(model_dir, "saved_model.pb"))


def completed_trials(run_dir):
    """Trial ids that Keras Tuner has saved as COMPLETED."""
    done = set()
    for path in glob.glob(os.path.join(run_dir, "tuning", "search", "trial_*", "trial.json")):
        with open(path) as handle:
            state = json.load(handle)  # atomic writes: never a partial file, even mid-kill
        if state["status"] == "COMPLETED":
            done.add(state["trial_id"])
    return done


def test_a_killed_chief_resumes_without_repeating_finished_trials(digits_data, tmp_path):
    run_dir = fresh_run(digits_data, tmp_path)
    tuning = os.path.join(run_dir, "tuning")
    trials_4 = ["--set", "tune.max_trials=4"]
    process = tune_process(run_dir, *trials_4)  # a single process is its own chief
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(read_trial_stats(tuning)) >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.communicate(timeout=60)
    finished = completed_trials(run_dir)
    assert finished  # at least the first trial had ended when the second one's figures appeared
    done_before = {trial_id: figures for trial_id, figures in read_trial_stats(tuning).items() if trial_id in finished}
    resumed = tune_process(run_dir, *trials_4)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    trials = read_trials(run_dir)
    assert len(trials) == 4 and all(t["status"] == "COMPLETED" for t in trials)
    after = read_trial_stats(tuning)
    for trial_id, took in done_before.items():
        assert after[trial_id] == took  # a finished trial was never run again


def test_retrain_best_trains_on_train_and_validation_and_exports(digits_data, tmp_path, capsys):
    """... once: the same command again finds the search complete and its best trial exported, and
    neither retrains (RUN/train, which the user may have retrained since, is left alone) nor exports."""
    from kcp import cli

    run_dir = fresh_run(digits_data, tmp_path)
    command = ["tune", "--run-dir", run_dir, "--set", "tune.max_trials=2", "--set", "tune.retrain_best=true",
               "--set", "model.filters=[8]", "--set", "train.epochs=2"]
    code = cli.main(command)
    assert code == 0
    metrics_path = os.path.join(run_dir, "train", "metrics.json")
    trained = open(metrics_path).read()
    capsys.readouterr()
    assert cli.main(command) == 0
    said = capsys.readouterr().out
    assert open(metrics_path).read() == trained
    assert os.listdir(os.path.join(run_dir, "export", "model")) == ["1"]
    export_dir = os.path.join(run_dir, "export", "model", "1")
    assert f"already retrained and exported to {export_dir}; not retrained again" in said, said
    history = json.load(open(os.path.join(run_dir, "train", "history.json")))
    assert "val_accuracy" not in history  # validation was part of the training data
    metrics = json.load(open(os.path.join(run_dir, "train", "metrics.json")))
    assert metrics["examples_per_second"] > 0
    assert os.path.exists(os.path.join(run_dir, "export", "model", "1", "saved_model.pb"))
    best = json.load(open(os.path.join(run_dir, "tuning", "best_hparams.json")))
    from kcp.core.config import read_yaml_file

    recorded = read_yaml_file(os.path.join(run_dir, "config.yaml"))
    assert recorded["tune"]["retrain_best"] is True
    assert set(best["hyperparameters"]) == {"model.kernel_size", "model.dropout", "train.learning_rate"}
    # config.yaml describes RUN/train/model.keras: the best trial's values, fitted on train + validation
    assert recorded["model"]["kernel_size"] == best["hyperparameters"]["model.kernel_size"]
    assert recorded["train"]["learning_rate"] == best["hyperparameters"]["train.learning_rate"]
    assert recorded["train"]["include_validation"] is True


def test_the_vertex_tuning_entry_hands_the_retrained_best_to_aip_model_dir(digits_data, tmp_path, monkeypatch,
                                                                          capsys):
    from tuning import task

    run_dir = fresh_run(digits_data, tmp_path)
    model_dir = tmp_path / "aip" / "model"
    monkeypatch.setenv("AIP_MODEL_DIR", str(model_dir))
    argv = ["--job-dir", run_dir, "--set", "tune.max_trials=1", "--set", "model.filters=[8]", "--set", "train.epochs=1"]
    assert task.main(argv) == 0 and not model_dir.exists()  # a search alone trains no final model, and says so
    assert (f"[tune] AIP_MODEL_DIR {model_dir}: nothing handed over, since tune.retrain_best is false"
            in capsys.readouterr().out)
    assert task.main([*argv, "--set", "tune.retrain_best=true"]) == 0
    version = os.path.join(run_dir, "export", "model", "1")
    assert (model_dir / "saved_model.pb").read_bytes() == open(os.path.join(version, "saved_model.pb"), "rb").read()
    assert json.loads((model_dir / "assets.extra" / "validation.json").read_text())["blessed"] is True


def test_a_finished_retrain_is_not_repeated_unless_something_changed(tmp_path):
    """retrained.json names the best trial and its export: the same complete search is not retrained again;
    new trials, another best trial, another final config or a deleted export retrain."""
    from tuning.results import record_retrained, retrained_export

    run_dir = str(tmp_path)
    os.makedirs(tmp_path / "tuning")
    export_dir = tmp_path / "export" / "model" / "1"
    os.makedirs(export_dir)
    (export_dir / "saved_model.pb").write_bytes(b"pb")
    final = load_config([], ["model.kernel_size=5", "train.include_validation=true"])
    summary = {"best_trial": "1", "best_score": 0.9, "new_trials": 2}
    assert retrained_export(run_dir, summary, final) is None  # nothing recorded yet
    record_retrained(run_dir, summary, final, str(export_dir))
    complete = {**summary, "new_trials": 0}
    assert retrained_export(run_dir, complete, final) == str(export_dir)
    assert retrained_export(run_dir, complete, load_config([], ["model.kernel_size=5", "train.include_validation=true",
                                                                "tune.max_trials=20"])) == str(export_dir)
    assert retrained_export(run_dir, summary, final) is None  # this run ran new trials
    assert retrained_export(run_dir, {**complete, "best_trial": "0"}, final) is None
    assert retrained_export(run_dir, complete, load_config([], ["model.kernel_size=3"])) is None
    os.remove(export_dir / "saved_model.pb")
    assert retrained_export(run_dir, complete, final) is None  # the export is gone: retrain


def test_best_config_is_the_best_trial_fitting_on_train_and_validation(tmp_path):
    config = load_config([], ["model.kernel_size=3", "train.learning_rate=0.01"])
    with pytest.raises(ConfigError, match="best_hparams.json does not exist; no trial completed"):
        best_config(config, str(tmp_path))
    os.makedirs(tmp_path / "tuning")
    best = {"best_trial": "02", "hyperparameters": {"model.kernel_size": 5, "train.learning_rate": 0.002}}
    (tmp_path / "tuning" / "best_hparams.json").write_text(json.dumps(best))
    final = best_config(config, str(tmp_path))
    assert (final.model.kernel_size, final.train.learning_rate) == (5, 0.002)
    assert final.train.include_validation is True
    assert final.to_dict()["data"] == config.to_dict()["data"]


def test_a_trial_is_built_and_fitted_by_the_trainer_entry(digits_data, tmp_path):
    """The trial gets the trainer's compile (optimizer, one-hot labels for label smoothing)
    and Keras Tuner's fit arguments (but its epochs: the trial's train.epochs); it is scored on validation
    even if the config fits on it."""
    run_dir = fresh_run(digits_data, tmp_path)
    config = load_config([], [*SMALL, "train.optimizer=sgd", "train.label_smoothing=0.1",
                              "train.include_validation=true", "tune.space={model.kernel_size: [3, 5]}"])
    hypermodel = TrainerHyperModel(config, run_dir, search_space(config))
    hp = kt.HyperParameters()
    model = hypermodel.build(hp)
    assert hp.values == {"model.kernel_size": 3}
    assert type(model.optimizer).__name__ == "SGD"
    assert isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    history = hypermodel.fit(hp, model, epochs=1, verbose=0, callbacks=[])
    # the trial's own train.epochs (2), not search()'s epochs, which only hyperband's brackets set per trial
    assert len(history.history["loss"]) == 2 and "val_accuracy" in history.history
    assert not os.path.exists(os.path.join(run_dir, "train"))  # a trial writes no training outputs


def test_workers_exit_cleanly_when_the_chief_is_gone(digits_data, tmp_path):
    run_dir = fresh_run(digits_data, tmp_path)
    oracle = f"127.0.0.1:{free_port()}"
    chief = tune_process(run_dir, "--role", "chief", "--oracle", oracle)
    worker = tune_process(run_dir, "--role", "worker", "--oracle", oracle, "--tuner-id", "worker0",
                          "--set", "tune.chief_timeout=6")
    tuning = os.path.join(run_dir, "tuning")
    deadline = time.time() + 300
    while time.time() < deadline and not read_trial_stats(tuning):  # the worker finished a trial
        time.sleep(0.2)
    chief.send_signal(signal.SIGKILL)
    chief.communicate(timeout=60)
    started = time.time()
    output = worker.communicate(timeout=180)[0]
    assert worker.returncode == 0, output[-2000:]
    waited = time.time() - started
    assert 3 <= waited < 60, waited  # tune.chief_timeout (6 s, less one 2 s probe), plus a trial in progress
    assert "the chief at 127.0.0.1" in output and "is gone" in output


def test_a_worker_with_another_config_than_its_chief_is_refused_and_records_nothing(digits_data, tmp_path):
    """Its trials would be scored under the chief's best_config.yaml; it says which keys differ, exit 2."""
    run_dir = fresh_run(digits_data, tmp_path)
    oracle = f"127.0.0.1:{free_port()}"
    chief = tune_process(run_dir, "--role", "chief", "--oracle", oracle)
    try:
        worker = tune_process(run_dir, "--role", "worker", "--oracle", oracle, "--tuner-id", "worker0",
                              "--set", "train.epochs=1", "--set", "train.optimizer=sgd")
        output = worker.communicate(timeout=300)[0]
        assert worker.returncode == 2, output[-2000:]
        error = [line for line in output.splitlines() if line.startswith("kcp tune: error:")]
        assert len(error) == 1 and "this worker's config differs from the search its chief serves" in error[0], output
        assert 'train.epochs 1 (the search\'s: 2)' in error[0] and 'train.optimizer "sgd" (the search\'s: ' in error[0]
        with open(os.path.join(run_dir, "config.yaml")) as handle:
            recorded = yaml.safe_load(handle)
        assert recorded["train"]["epochs"] == 2 and recorded["train"]["optimizer"] != "sgd"  # the chief's, kept
        same = tune_process(run_dir, "--role", "worker", "--oracle", oracle, "--tuner-id", "worker1",
                            "--set", "tune.max_trials=1")  # max_trials may differ (a resume may raise it)
        deadline = time.time() + 300
        while time.time() < deadline and same.poll() is None and not glob.glob(
                os.path.join(run_dir, "tuning", "**", "trial_*"), recursive=True):
            time.sleep(0.2)
        assert same.poll() is None, same.communicate()[0][-2000:]  # it passed the check and works on a trial
        same.kill()
        same.communicate(timeout=60)
    finally:
        chief.kill()
        chief.communicate(timeout=60)


def test_half_a_tuner_role_is_one_line_before_the_search_writes(monkeypatch):
    """KERASTUNER_ORACLE_IP without its port ended in Keras Tuner's RuntimeError after RUN/tuning was
    begun; --oracle without --role ran a search alone, silently."""
    from kcp.core.cluster import take_tuner_role
    from kcp.core.errors import UserError

    for name in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match=r"^--oracle: give --role chief or --role worker with it"):
        take_tuner_role(None, "127.0.0.1:8000", None)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    with pytest.raises(UserError, match=r"^KERASTUNER_ORACLE_IP set without KERASTUNER_ORACLE_PORT, "
                                        r"KERASTUNER_TUNER_ID: a distributed search needs all three"):
        take_tuner_role(None, None, None)
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner1")
    take_tuner_role(None, None, None)  # all three: Keras Tuner's own way of naming the roles


def test_a_chief_never_reached_or_a_port_it_cannot_serve_on_is_one_line(monkeypatch, capsys):
    from kcp.core.errors import UserError
    from tuning import search

    port = free_port()
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(port))
    monkeypatch.setattr(search, "CHIEF_START_SECONDS", 1)
    with pytest.raises(UserError, match=rf"^--oracle: could not reach the chief at 127.0.0.1:{port} in 1 s "):
        search.wait_for_chief(0.5, interval=0.2)
    # a port whose last connection the server closed (TIME_WAIT, as a restarted chief finds its port) is servable
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's server binds
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        accepted.close()
        client.close()
        reused = server.getsockname()[1]
    search.check_oracle_port("127.0.0.1", reused)
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "http")
    with pytest.raises(UserError, match=r"^KERASTUNER_ORACLE_PORT: 'http' is not a port number \(1 to 65535\)$"):
        search.wait_for_chief(0.5, interval=0.2)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "[::1]")  # as --oracle [::1]:PORT sets it
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(port))
    assert search.oracle_address() == ("::1", port)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match=rf"^--oracle: the chief cannot serve on 127.0.0.1:{taken.getsockname()[1]} "):
            search.check_oracle_port("127.0.0.1", taken.getsockname()[1])
        monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(taken.getsockname()[1]))
        search.wait_for_chief(0.5, interval=0.2)  # a chief that answers: returns
    assert cli.main(["tune", "--run-dir", "unused", "--role", "chief", "--oracle", "127.0.0.1:notaport"]) == 2
    assert "--oracle: '127.0.0.1:notaport' has no port number" in capsys.readouterr().err


def test_an_extended_search_killed_midway_leaves_no_results_of_the_old_one(digits_data, tmp_path, monkeypatch):
    """best_config.yaml appears only once the search is complete: the 2-trial search's results must not
    stand for the 3-trial search that was killed; running it again completes it and writes them."""
    run_dir = fresh_run(digits_data, tmp_path)
    base = [*SMALL, "train.epochs=1", "tune.space={model.kernel_size: [3, 5, 7]}", "tune.algorithm=grid"]
    run_search(load_config([], [*base, "tune.max_trials=2"]), run_dir)
    tuning = os.path.join(run_dir, "tuning")
    assert os.path.exists(os.path.join(tuning, "best_config.yaml")) and len(read_trials(run_dir)) == 2

    def killed(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(kt.Tuner, "search", killed)
    with pytest.raises(KeyboardInterrupt):
        run_search(load_config([], [*base, "tune.max_trials=3"]), run_dir)
    assert not any(os.path.exists(os.path.join(tuning, name))
                   for name in ("best_config.yaml", "best_hparams.json", "trials.csv", "trials.png"))
    monkeypatch.undo()
    result = run_search(load_config([], [*base, "tune.max_trials=3"]), run_dir)
    assert result["trials"] == 3 and result["new_trials"] == 1
    assert os.path.exists(os.path.join(tuning, "best_config.yaml")) and len(read_trials(run_dir)) == 3


def test_an_interrupted_keras_tuner_state_write_keeps_the_previous_state(tmp_path, monkeypatch):
    """keras-tuner 1.4 truncates trial.json before writing it; a kill in between broke every resume."""
    from keras_tuner.src import utils as kt_utils

    from tuning import compat

    assert compat.patch_keras_tuner_atomic_json()
    path = str(tmp_path / "trial.json")
    kt_utils.save_json(path, {"status": "RUNNING", "trial_id": "0001"})

    def killed(*args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError):
        kt_utils.save_json(path, {"status": "COMPLETED", "trial_id": "0001"})
    assert kt_utils.load_json(path) == {"status": "RUNNING", "trial_id": "0001"}
    monkeypatch.undo()
    kt_utils.save_json(path, {"status": "COMPLETED", "trial_id": "0001"})
    assert kt_utils.load_json(path)["status"] == "COMPLETED"
    assert os.listdir(tmp_path) == ["trial.json"]  # no temporary left behind


@pytest.mark.parametrize("killed", [True, False])
def test_a_trial_ended_on_disk_is_not_trained_again(tmp_path, killed):
    """keras-tuner 1.4 writes trial.json (COMPLETED), then oracle.json still listing the trial as
    ongoing (killed: a kill came before oracle.json was written at all); every resume trained it again."""
    from tuning import compat

    assert compat.patch_keras_tuner_atomic_json() and compat.patch_keras_tuner_resume_completed()
    space = kt.HyperParameters()
    space.Float("learning_rate", 1e-4, 1e-1, sampling="log")

    def oracle():
        made = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=3,
                                             hyperparameters=space, seed=1)
        made._set_project_dir(str(tmp_path), "search")
        return made

    first = oracle()
    trial = first.create_trial("tuner0")
    oracle_json = tmp_path / "search" / "oracle.json"
    ongoing = oracle_json.read_text()  # the oracle's file while the trial runs
    first.update_trial(trial.trial_id, {"val_accuracy": 0.75})
    trial.status = "COMPLETED"
    first.end_trial(trial)
    if killed:
        oracle_json.write_text(ongoing)  # killed after trial.json was written, before oracle.json
    else:
        assert json.loads(oracle_json.read_text())["ongoing_trials"] == {"tuner0": trial.trial_id}
    resumed = oracle()
    resumed.reload()
    assert resumed.end_order == [trial.trial_id]
    assert resumed._run_times[trial.trial_id] == 1
    assert resumed.create_trial("tuner0").trial_id != trial.trial_id
    assert [t.trial_id for t in resumed.get_best_trials()] == [trial.trial_id]
    assert resumed.get_best_trials()[0].score == 0.75
    assert json.loads(oracle_json.read_text())["retry_queue"] == []


def test_the_chief_gives_a_silent_workers_trial_to_the_next_and_keeps_one_that_reports(tmp_path, monkeypatch):
    """Keras Tuner's chief waited forever for a worker that died mid-trial. A worker that reports
    (its heartbeat) keeps its trial however long it runs; a silent one's trial goes to the next worker,
    and workers asking while trials run wait instead of stopping, so one is left to take it."""
    from keras_tuner.src.distribute import oracle_chief

    from tuning.workers import exit_chief_when_every_trial_ended, watch_workers

    monkeypatch.setattr(oracle_chief, "exit_chief", oracle_chief.exit_chief)  # put back after the test
    space = kt.HyperParameters()
    space.Float("learning_rate", 1e-4, 1e-1, sampling="log")
    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=2,
                                           hyperparameters=space, seed=1)
    oracle._set_project_dir(str(tmp_path), "search")
    exit_chief_when_every_trial_ended()
    stop_watching = watch_workers(oracle, worker_timeout=0.6, interval=0.05)
    try:
        kept = oracle.create_trial("beating")
        lost = oracle.create_trial("silent")
        for _ in range(30):  # 1.5 s, over twice the timeout: one worker reports, the other is silent
            oracle.get_trial(kept.trial_id)
            time.sleep(0.05)
        assert set(oracle.ongoing_trials) == {"beating"} and oracle.tuner_ids == {"beating"}
        assert oracle._retry_queue == [lost.trial_id]
        assert json.loads((tmp_path / "search" / "oracle.json").read_text())["retry_queue"] == [lost.trial_id]
        assert not oracle_chief.exit_chief(oracle)
        kept.status = "COMPLETED"
        oracle.update_trial(kept.trial_id, {"val_accuracy": 0.5})
        oracle.end_trial(kept)
        assert not oracle_chief.exit_chief(oracle)  # no trial runs, but one waits for a worker
        again = oracle.create_trial("replacement")  # the queued trial comes before any new one (max_trials reached)
        assert again.trial_id == lost.trial_id and again.status == "RUNNING"
        assert oracle.create_trial("beating").status == "IDLE"  # not STOPPED while a trial runs: it might be lost
        oracle.update_trial(again.trial_id, {"val_accuracy": 0.75})
        again.status = "COMPLETED"
        oracle.end_trial(again)
        late = kt.engine.trial.Trial(space, trial_id=lost.trial_id, status="COMPLETED")
        oracle.update_trial(lost.trial_id, {"val_accuracy": 0.1})  # the silent worker was only slow: its
        oracle.end_trial(late)  # reports come after the trial ended, and change nothing
        assert oracle.end_order == [kept.trial_id, lost.trial_id] and oracle._run_times[lost.trial_id] == 1
        assert oracle.trials[lost.trial_id].metrics.get_history("val_accuracy")[-1].value == [0.75]
        assert oracle.create_trial("beating").status == "STOPPED"
        assert not oracle_chief.exit_chief(oracle)  # "replacement" has not been told to stop yet
        assert oracle.create_trial("replacement").status == "STOPPED"
        assert oracle_chief.exit_chief(oracle)
        assert [t.trial_id for t in oracle.get_best_trials()] == [lost.trial_id]
    finally:
        stop_watching()


def test_a_worker_killed_mid_trial_does_not_hang_the_chief(digits_data, tmp_path):
    run_dir = fresh_run(digits_data, tmp_path)
    oracle = f"127.0.0.1:{free_port()}"
    trials_3 = ["--set", "tune.max_trials=3", "--set", "tune.worker_timeout=10"]
    chief = tune_process(run_dir, "--role", "chief", "--oracle", oracle, *trials_3)
    doomed = tune_process(run_dir, "--role", "worker", "--oracle", oracle, "--tuner-id", "worker0", *trials_3)
    processes = [chief, doomed]
    oracle_json = os.path.join(run_dir, "tuning", "search", "oracle.json")

    def oracle_state():
        if not os.path.exists(oracle_json):
            return {"ongoing_trials": {}, "retry_queue": []}
        with open(oracle_json) as handle:
            return json.load(handle)  # atomic writes: whole files only

    try:
        deadline = time.time() + 300
        while time.time() < deadline and "worker0" not in oracle_state()["ongoing_trials"]:
            time.sleep(0.05)
        held = oracle_state()["ongoing_trials"]["worker0"]
        doomed.send_signal(signal.SIGKILL)  # mid-trial: it has just been given one
        doomed.communicate(timeout=60)
        while time.time() < deadline and not oracle_state()["retry_queue"]:  # the chief gave up on it
            time.sleep(0.2)
        assert oracle_state()["retry_queue"] == [held]
        replacement = tune_process(run_dir, "--role", "worker", "--oracle", oracle, "--tuner-id", "tuner1", *trials_3)
        processes.append(replacement)
        outputs = [process.communicate(timeout=600)[0] for process in (replacement, chief)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, output in zip((replacement, chief), outputs):
        assert process.returncode == 0, output[-3000:]
    assert f"trial {held} goes back to the queue for the next worker" in outputs[1]
    trials = read_trials(run_dir)
    assert sorted(t["trial_id"] for t in trials) == sorted({t["trial_id"] for t in trials}) and len(trials) == 3
    assert all(t["status"] == "COMPLETED" for t in trials) and held in {t["trial_id"] for t in trials}


def test_a_resumed_grid_search_walks_on_through_its_grid(tmp_path):
    """keras-tuner 1.4 keeps the grid walk out of oracle.json: a resumed grid search failed with
    KeyError at its next trial. It goes on with the combinations not yet tried, then stops."""
    from tuning import compat

    assert compat.patch_keras_tuner_resume_completed()
    space = kt.HyperParameters()
    space.Choice("units", [8, 16, 32])
    space.Choice("dropout", [0.0, 0.5])

    def oracle():
        made = kt.oracles.GridSearchOracle(objective=kt.Objective("val_accuracy", "max"), max_trials=20,
                                           hyperparameters=space, seed=1)
        made._set_project_dir(str(tmp_path), "search")
        return made

    def run(tuner_oracle, count):
        values = []
        for _ in range(count):
            trial = tuner_oracle.create_trial("tuner0")
            if trial.status != "RUNNING":
                break
            values.append(tuple(sorted(trial.hyperparameters.values.items())))
            tuner_oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5})
            trial.status = "COMPLETED"
            tuner_oracle.end_trial(trial)
        return values

    first = run(oracle(), 2)
    resumed = oracle()
    resumed.reload()
    rest = run(resumed, 10)
    assert len(first) == 2 and len(rest) == 4 and len(set(first + rest)) == 6  # the whole grid, each once


def test_trials_csv_leaves_figures_empty_for_a_trial_whose_process_died_before_writing_them():
    assert figures(None) == ["", ""]
    assert figures({"seconds": 12.34, "rss_mb": 810.6}) == ["12.3", "811"]


def tune_command(run_dir, model, *overrides):
    command = ["tune", "--run-dir", run_dir, "--model", model]
    for override in ("tune.algorithm=random", "tune.max_trials=2", "train.epochs=1", "tune.retrain_best=false",
                     *overrides):
        command += ["--set", override]
    return command


def test_the_same_tune_resumes_after_training_its_best_config(digits_data, tmp_path, capsys):
    """docs/tuning.md's sequence: tune, `kcp train --config RUN/tuning/best_config.yaml` (which records
    the best values in RUN/config.yaml), then the same tune command again: it resumes the finished
    search instead of refusing it; a search with other fixed keys or another model is still refused."""
    from kcp import cli
    from kcp.core.config import read_yaml_file

    run_dir = fresh_run(digits_data, tmp_path)
    tune = tune_command(run_dir, "cnn", "model.filters=[8]")
    assert cli.main(tune) == 0
    tuning = os.path.join(run_dir, "tuning")
    trials = read_trials(run_dir)
    assert cli.main(["train", "--run-dir", run_dir, "--config", os.path.join(tuning, "best_config.yaml")]) == 0
    best = json.load(open(os.path.join(tuning, "best_hparams.json")))["hyperparameters"]
    recorded = read_yaml_file(os.path.join(run_dir, "config.yaml"))
    assert recorded["train"]["learning_rate"] == best["train.learning_rate"]  # the train step changed config.yaml
    assert best["train.learning_rate"] != load_config().train.learning_rate
    capsys.readouterr()
    assert cli.main(tune) == 0, capsys.readouterr().err
    assert read_trials(run_dir) == trials  # the search was complete: nothing run again
    for other in (tune_command(run_dir, "cnn", "model.filters=[16]"), tune_command(run_dir, "resnet")):
        capsys.readouterr()  # another fixed key; another model family
        assert cli.main(other) != 0
        error = capsys.readouterr().err
        assert "holds a search made for another model section" in error and f"delete {tuning}" in error


def test_equal_scores_name_the_lowest_trial_whatever_order_the_oracle_holds():
    """A resumed search reloads its trials in another order; the best of equal scores stays the first."""
    from types import SimpleNamespace

    from tuning.results import best_trials

    def trial(trial_id, score, status="COMPLETED"):
        return SimpleNamespace(trial_id=trial_id, score=score, status=status)

    held = [trial("02", 0.9), trial("00", 0.9), trial("03", 0.95, "RUNNING"), trial("01", 0.8), trial("04", None)]
    for order in (held, held[::-1]):
        assert [t.trial_id for t in best_trials(order, "max")] == ["00", "02", "01"]
        assert [t.trial_id for t in best_trials(order, "min")] == ["01", "00", "02"]


def one_line_error(capsys, after_trial_tracebacks: bool = False) -> str:
    """kcp's one-line error: all of stderr, or its last line after the tracebacks Keras Tuner prints of each
    failed trial."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("kcp tune: error: "), err[-5:]
    assert after_trial_tracebacks or len(err) == 1, err
    return err[-1]


def test_searched_epochs_are_the_epochs_each_trial_trains(digits_data, tmp_path):
    """`train.epochs` in the space was accepted and ignored (search()'s epochs won): the trial listed as
    3 epochs trained 1. Each trial's last objective observation is now at its last epoch."""
    from kcp import cli

    run_dir = fresh_run(digits_data, tmp_path)
    assert cli.main(["tune", "--run-dir", run_dir, "--set", "model.filters=[8]", "--set", "train.epochs=1",
                     "--set", "tune.early_stopping_patience=0", "--set", "tune.algorithm=grid",
                     "--set", "tune.space={train.epochs: [1, 3]}"]) == 0
    trained = {}
    for path in glob.glob(os.path.join(run_dir, "tuning", "search", "trial_*", "trial.json")):
        state = json.load(open(path))
        observations = state["metrics"]["metrics"]["val_accuracy"]["observations"]
        trained[state["hyperparameters"]["values"]["train.epochs"]] = max(o["step"] for o in observations) + 1
    assert trained == {1: 1, 3: 3}


def test_objectives_that_contradict_their_direction_and_fixed_keys_in_a_space_are_one_line():
    with pytest.raises(ConfigError, match=r"^tune.direction: max for tune.objective 'val_loss', which is better "
                                          r"lower; set tune.direction=min$"):
        load_config([], ["tune.objective=val_loss"])  # picked the trial of the highest loss
    assert load_config([], ["tune.objective=val_loss", "tune.direction=min"]).tune.direction == "min"
    with pytest.raises(ConfigError, match=r"^tune.space: 'train.include_validation' is false in every trial"):
        search_space(load_config([], ["tune.space={train.include_validation: [true]}"]))
    with pytest.raises(ConfigError, match=r"^tune.space: 'train.epochs' is set by hyperband"):
        search_space(load_config([], ["tune.algorithm=hyperband", "tune.space={train.epochs: [1, 3]}"]))
    assert search_space(load_config([], ["tune.algorithm=grid", "tune.space={train.epochs: [1, 3]}"]))


def test_a_validation_objective_without_a_validation_split_fails_before_any_trial(digits_data, tmp_path, capsys):
    """A contract with 0 validation examples (a small data.limit, data.split with 0 validation) scores no trial
    on a `val_` objective: one line naming tune.objective, before anything is written under RUN/tuning/."""
    import shutil

    from kcp import cli

    run_dir = str(tmp_path / "run")
    shutil.copytree(os.path.join(digits_data, "data"), os.path.join(run_dir, "data"))
    path = os.path.join(run_dir, "data", "metadata.json")
    contract = json.load(open(path))
    contract["splits"]["validation"]["count"] = 0
    json.dump(contract, open(path, "w"))
    capsys.readouterr()
    assert cli.main(tune_command(run_dir, "cnn", "tune.objective=val_loss", "tune.direction=min")) == 2
    error = one_line_error(capsys)
    assert "tune.objective: 'val_loss' is measured on the validation split, and there is no validation split" in error
    assert "holds 0 validation examples" in error and "tune.objective=loss" in error
    assert not os.path.exists(os.path.join(run_dir, "tuning"))


def test_an_objective_the_training_does_not_log_stops_at_the_first_epoch(digits_data, tmp_path, capsys, monkeypatch):
    """A typo (val_acc) used to train every trial in full, fail each in Keras Tuner with KeyError and exit 0.
    Now: one line after the first epoch naming the objective and what is logged; the search it began is
    removed, so the corrected command starts afresh (rather than being refused as another tune section)."""
    from kcp import cli
    from trainer.train import Trainer

    epochs = []

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs.append(epoch)

    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, model, callbacks=(), **kw: fit(self, model, [*callbacks, Count()],
                                                                                     **kw))
    run_dir = fresh_run(digits_data, tmp_path)
    capsys.readouterr()
    assert cli.main(tune_command(run_dir, "cnn", "model.filters=[8]", "train.epochs=2", "tune.objective=val_acc")) == 2
    error = one_line_error(capsys)
    assert "tune.objective: 'val_acc' is not logged by the training, which logs accuracy, loss" in error
    assert "val_accuracy" in error and "stopped in its first epoch" in error
    assert epochs == [0]  # one epoch of one trial
    assert not os.path.exists(os.path.join(run_dir, "tuning"))
    assert cli.main(tune_command(run_dir, "cnn", "model.filters=[8]", "train.epochs=2", "tune.max_trials=1")) == 0
    assert [t["status"] for t in read_trials(run_dir)] == ["COMPLETED"]


@pytest.mark.parametrize("trials", [2, 4])  # 4: Keras Tuner stops itself after 3 failed trials in a row
def test_a_search_without_a_scored_trial_is_an_error_naming_trials_csv(digits_data, tmp_path, capsys, monkeypatch,
                                                                       trials):
    from kcp import cli

    def crash(self, hp, model, *args, **kwargs):
        raise RuntimeError("trial crashed")

    monkeypatch.setattr(TrainerHyperModel, "fit", crash)
    run_dir = fresh_run(digits_data, tmp_path)
    capsys.readouterr()
    assert cli.main(tune_command(run_dir, "cnn", "model.filters=[8]", f"tune.max_trials={trials}")) == 2
    error = one_line_error(capsys, after_trial_tracebacks=True)
    csv_path = os.path.join(run_dir, "tuning", "trials.csv")
    assert error.endswith(f"; see {csv_path}") and "failed with RuntimeError: trial crashed" in error
    assert ("no trial was scored (2 trials: 2 FAILED)" if trials == 2 else "after 3 failed trials in a row") in error
    assert [t["status"] for t in read_trials(run_dir)] == ["FAILED"] * min(trials, 3)
    assert not os.path.exists(os.path.join(run_dir, "tuning", "best_config.yaml"))


@pytest.mark.parametrize("algorithm, extra, header", [
    ("random", [], "[tune] random over cnn, 2 trials"),
    ("random", ["tune.max_trials=1"], "[tune] random over cnn, 1 trial"),
    ("grid", ["tune.max_trials=20", "tune.space={model.kernel_size: [3, 5], model.batch_norm: [true, false]}"],
     "[tune] grid over cnn, 4 trials"),  # the grid's size, below max_trials
    ("grid", ["tune.space={model.kernel_size: [3, 5], model.batch_norm: [true, false]}"],
     "[tune] grid over cnn, 2 trials"),  # max_trials, below the grid's size
    ("hyperband", [], "[tune] hyperband over cnn, brackets of up to 1 epoch a trial (hyperband's factor 3; "
                      "train.epochs, not tune.max_trials, sets how many trials)"),
])
def test_the_header_claims_a_trial_count_only_where_max_trials_sets_it(tmp_path, capsys, monkeypatch, algorithm,
                                                                       extra, header):
    from kcp import api, cli

    monkeypatch.setattr(api, "tune", lambda *args, **kwargs: api.TuneResult({}))
    assert cli.main(tune_command(str(tmp_path), "cnn", f"tune.algorithm={algorithm}", *extra)) == 0
    assert capsys.readouterr().out.splitlines()[0] == header
