"""Fault injection: kill a stage (SIGKILL, as a preemption does) before or after an artifact
write, rerun the same command, and check that no reader saw a partial or mismatched artifact
and that the rerun ends as an uninterrupted run would.

The kill point is chosen by KCP_KILL_AT (kcp/core/storage.py `fault_point`): "before:NAME" or
"after:NAME[:N]" kills at the N-th write or rename of a file named NAME; `kcp tune` also has
"after:epoch:N" (its N-th finished epoch, inside a trial) and "after:trial-end:N" (between trials). Every case is marked
`faults` (run them all with `make test-faults`) except a fixed sample that `make test` runs.
"""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile

import keras
import pytest

from kcp.core import storage
from kcp.core.layout import RunLayout
from tests.conftest import IN_PROCESS_BEAM, fresh_run
from tuning.hypermodel import read_trial_stats

TRAIN = ["--set", "train.epochs=2", "--set", "model.filters=[8]", "--set", "train.deterministic=true",
         "--set", "train.cache=false"]
QUIET = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def kcp(env, *args, kill_at=None):
    env = {**env, **({"KCP_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([sys.executable, "-m", "kcp.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def killed(result):
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-3000:]


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def model_digest(path: str) -> str:
    from trainer.outputs import weights_digest

    with tempfile.TemporaryDirectory() as local:
        copy = os.path.join(local, "model.keras")
        with open(copy, "wb") as handle:
            handle.write(storage.read_bytes(path))
        return weights_digest(keras.saving.load_model(copy))


def assert_train_pair_consistent(run_dir: str) -> None:
    """What a reader (export, validate) sees: metrics.json absent, or describing model.keras."""
    layout = RunLayout(run_dir)
    if storage.exists(layout.metrics) and storage.exists(layout.model):
        metrics = json.loads(storage.read_text(layout.metrics))
        assert metrics["weights_sha256"] == model_digest(layout.model)
    for name in storage.list_dir(layout.train):
        assert ".tmp-" not in name or name.startswith("model.tmp-"), name  # only a killed save's temporary


# Kill points of `kcp train`, in the order the trainer reaches them.
TRAIN_POINTS = ["after:history.json:1", "before:confusion_matrix.json", "before:model.keras", "after:model.keras",
                "before:metrics.json"]
SAMPLE = {"after:model.keras"}  # the window between model.keras and metrics.json


def _train_cases():
    for where in ("local", "gcs"):
        for point in TRAIN_POINTS:
            marks = [] if where == "local" and point in SAMPLE else [pytest.mark.faults]
            yield pytest.param(where, point, marks=marks, id=f"{where}-{point}")


@pytest.fixture
def gcs_env(request):
    """The environment of a subprocess on a gs:// run directory (emulator and the TLS proxy)."""
    emulator, proxy = request.getfixturevalue("gcs_emulator"), request.getfixturevalue("google_apis")
    request.getfixturevalue("gcs")
    return {**QUIET, **emulator.environment(), **proxy.environment()}


def _run_dir(where, digits_data, tmp_path, request, name):
    if where == "local":
        return fresh_run(digits_data, tmp_path), QUIET
    env = request.getfixturevalue("gcs_env")
    gcs = request.getfixturevalue("gcs")
    prefix = f"faults/{name}-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**8}"
    data = os.path.join(digits_data, "data")
    for root, _, files in os.walk(data):
        for file in files:
            path = os.path.join(root, file)
            gcs.bucket("kcp-test").blob(f"{prefix}/data/{os.path.relpath(path, data)}").upload_from_filename(path)
    return f"gs://kcp-test/{prefix}", env


@pytest.mark.parametrize("where, point", list(_train_cases()))
def test_train_killed_at_an_artifact_write_reruns_to_the_same_result(where, point, digits_data, tmp_path, request):
    run_dir, env = _run_dir(where, digits_data, tmp_path, request, "train")
    layout = RunLayout(run_dir)
    killed(kcp(env, "train", "--run-dir", run_dir, *TRAIN, kill_at=point))
    assert_train_pair_consistent(run_dir)
    fitted = model_digest(layout.model) if point == "after:model.keras" else None  # the finished fit's weights

    ok(kcp(env, "train", "--run-dir", run_dir, *TRAIN))
    assert_train_pair_consistent(run_dir)
    assert not [name for name in storage.list_dir(layout.train) if ".tmp-" in name]  # a killed save's is removed
    metrics = json.loads(storage.read_text(layout.metrics))
    assert metrics["epochs"] == 2 and len(json.loads(storage.read_text(layout.history))["loss"]) == 2
    if fitted:
        assert metrics["weights_sha256"] == fitted  # resumed after the last epoch: nothing lost, nothing redone
    assert not storage.exists(storage.join(layout.train, "backup"))
    assert not storage.exists(storage.join(run_dir, ".kcp-lock"))


@pytest.mark.faults
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_export_killed_before_publishing_leaves_no_version_and_reruns(where, digits_data, tmp_path, request):
    run_dir, env = _run_dir(where, digits_data, tmp_path, request, "export")
    ok(kcp(env, "train", "--run-dir", run_dir, *TRAIN))
    point = "before:1" if where == "local" else "before:saved_model.pb"  # local: the rename; gs: the last copy
    killed(kcp(env, "export", "--run-dir", run_dir, kill_at=point))
    layout = RunLayout(run_dir)
    assert layout.versions("model") == []  # nothing a server or `kcp validate` would take
    out = ok(kcp(env, "export", "--run-dir", run_dir))
    versions = layout.versions("model")
    assert len(versions) == 1 and out.strip().endswith(str(versions[0]))
    assert "blessed" in ok(kcp(env, "validate", "--run-dir", run_dir))


@pytest.mark.faults
def test_push_killed_halfway_is_completed_by_pushing_again(digits_run, gcs_env, gcs):
    destination = f"gs://kcp-test/faults/pushed-{os.getpid()}"
    assert "blessed" in ok(kcp(QUIET, "validate", "--run-dir", digits_run))
    killed(kcp(gcs_env, "push", "--run-dir", digits_run, "--to", destination, kill_at="before:saved_model.pb"))
    prefix = destination[len("gs://kcp-test/"):]
    names = [blob.name for blob in gcs.list_blobs("kcp-test", prefix=prefix + "/")]
    assert names and not [n for n in names if n.endswith("/saved_model.pb")]
    ok(kcp(gcs_env, "push", "--run-dir", digits_run, "--to", destination))
    names = [blob.name for blob in gcs.list_blobs("kcp-test", prefix=prefix + "/")]
    assert [n for n in names if n.endswith("/saved_model.pb")]
    again = kcp(gcs_env, "push", "--run-dir", digits_run, "--to", destination)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.faults
def test_preprocess_killed_before_its_contract_reruns_to_the_same_data(tmp_path):
    run_dir = str(tmp_path / "run")
    args = ["preprocess", "--run-dir", run_dir, "--source", "digits", "--", *IN_PROCESS_BEAM]
    killed(kcp(QUIET, *args, kill_at="before:metadata.json"))
    assert not os.path.exists(RunLayout(run_dir).metadata)  # no contract: no stage trains on partial data
    ok(kcp(QUIET, *args))
    first = json.loads(storage.read_text(RunLayout(run_dir).metadata))
    ok(kcp(QUIET, *args))
    second = json.loads(storage.read_text(RunLayout(run_dir).metadata))
    assert {k: v["count"] for k, v in first["splits"].items()} == {k: v["count"] for k, v in second["splits"].items()}


# `kcp tune`: three random trials of two epochs each, trial ids "0", "1", "2".
TUNE = [*TRAIN, "--set", "tune.algorithm=random", "--set", "tune.max_trials=3", "--set",
        "tune.early_stopping_patience=0", "--set", "tune.space={train.learning_rate: {min: 1.0e-3, max: 1.0e-1, "
        "sampling: log}}"]
# Kill points of `kcp tune` (tuning/hypermodel.py), and the trials Keras Tuner has recorded as
# completed by then: inside trial 1 (after its first epoch), between trials 0 and 1 (trial 0
# recorded, trial 1 not begun), and after the last trial while the results are written.
TUNE_POINTS = {"after:epoch:3": {"0"}, "after:trial-end:1": {"0"}, "before:best_config.yaml": {"0", "1", "2"}}


def trial_states(run_dir: str) -> dict:
    """{trial id: trial.json} of every trial Keras Tuner recorded; each one parses (atomic writes)."""
    search = storage.join(RunLayout(run_dir).tuning, "search")
    return {state["trial_id"]: state for state in
            (json.loads(storage.read_text(storage.join(search, name, "trial.json")))
             for name in storage.list_dir(search) if name.startswith("trial_")
             and storage.exists(storage.join(search, name, "trial.json")))}


def search_outcome(run_dir: str) -> tuple:
    """What a finished search produced, without its timings: trials.csv's rows (trial, value,
    score, status), best_hparams.json and best_config.yaml."""
    tuning = RunLayout(run_dir).tuning
    rows = csv.DictReader(io.StringIO(storage.read_text(storage.join(tuning, "trials.csv"))))
    trials = [{k: v for k, v in row.items() if k not in ("seconds", "rss_mb")} for row in rows]
    return (trials, json.loads(storage.read_text(RunLayout(run_dir).best_hparams)),
            storage.read_text(storage.join(tuning, "best_config.yaml")))


@pytest.fixture(scope="module")
def uninterrupted_search(digits_data, tmp_path_factory):
    """The outcome of the same search run once without a kill: what every rerun must end with."""
    run_dir = fresh_run(digits_data, tmp_path_factory.mktemp("tune-whole"))
    ok(kcp(QUIET, "tune", "--run-dir", run_dir, *TUNE))
    return search_outcome(run_dir)


# On gs://, Keras Tuner keeps its project (oracle.json, trial.json, checkpoints) in RUN/tuning/search
# on GCS itself, through TensorFlow's GCS filesystem (tf.io.gfile, here the proxy in front of the
# emulator); kcp's own files (trial_stats, the results, the lock) go through kcp.core.storage. No
# local working copy is synced: a killed process leaves only what it had uploaded. All three kill
# points run there too (about 30 s each); if one had to go, `after:trial-end:1` (a completed trial's
# state read back from GCS, the next one run) and `before:best_config.yaml` (every trial read back,
# none run again, the results written to GCS) are the two to keep.
TUNE_GCS_POINTS = list(TUNE_POINTS)


def _tune_cases():
    for where, points in (("local", list(TUNE_POINTS)), ("gcs", TUNE_GCS_POINTS)):
        for point in points:
            yield pytest.param(where, point, id=f"{where}-{point}")


@pytest.mark.faults
@pytest.mark.parametrize("where, point", list(_tune_cases()))
def test_tune_killed_inside_or_between_trials_resumes_to_the_same_search(where, point, digits_data, tmp_path,
                                                                         request, uninterrupted_search):
    run_dir, env = _run_dir(where, digits_data, tmp_path, request, "tune")
    tuning = RunLayout(run_dir).tuning
    killed(kcp(env, "tune", "--run-dir", run_dir, *TUNE, kill_at=point))
    before = trial_states(run_dir)
    done = {trial_id for trial_id, state in before.items() if state["status"] == "COMPLETED"}
    assert done == TUNE_POINTS[point]
    assert "search/oracle.json" in storage.list_files(tuning)  # the tuner's own state is in the run directory
    assert not storage.exists(storage.join(tuning, "best_config.yaml"))  # written only once the search is complete
    figures = read_trial_stats(tuning)

    ok(kcp(env, "tune", "--run-dir", run_dir, *TUNE))
    after = trial_states(run_dir)
    assert sorted(after) == ["0", "1", "2"] and all(state["status"] == "COMPLETED" for state in after.values())
    for trial_id in done:  # a completed trial is kept as it was, never run again
        assert after[trial_id] == before[trial_id] and read_trial_stats(tuning)[trial_id] == figures[trial_id]
    assert search_outcome(run_dir) == uninterrupted_search  # same trials, scores and best config
    assert not [path for path in storage.list_files(tuning) if ".tmp-" in path]
    assert not storage.exists(storage.join(run_dir, ".kcp-lock"))
