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
import shutil
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


# `kcp preprocess` of the digits with in-process Beam: one shard per split (train, validation, test).
PREPROCESS = ["--source", "digits", "--", *IN_PROCESS_BEAM]
FIRST_SHARD = "train-00000-of-00001.tfrecord"
# Kill points of `kcp preprocess`, in the order it reaches them: inside the shard writing (the
# train shard written whole under its temporary name, not yet renamed: pipeline/shards.py),
# all shards written but no contract, and the contract written (the process dies before exiting).
PREPROCESS_POINTS = [f"before:{FIRST_SHARD}", "before:metadata.json", "after:metadata.json"]


def _bare_run_dir(where, tmp_path, request, name):
    """An empty run directory, local or gs://, and the environment of a `kcp` subprocess on it."""
    if where == "local":
        return str(tmp_path / "run"), QUIET
    env = request.getfixturevalue("gcs_env")
    return f"gs://kcp-test/faults/{name}-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**8}", env


def data_state(run_dir: str) -> dict:
    """{name: sha256} of what a reader of RUN/data takes: the shards under their final names,
    labels.txt and metadata.json (the contract, written last)."""
    data = RunLayout(run_dir).data
    if not storage.exists(data):
        return {}
    return {name: storage.sha256(storage.join(data, name)) for name in storage.list_files(data)
            if name.endswith(".tfrecord") or name in ("metadata.json", "labels.txt")}


def data_leftovers(run_dir: str) -> list:
    """Staging folders, bundle parts, temporaries and summaries in RUN/data: what only a killed run leaves."""
    data = RunLayout(run_dir).data
    names = set(storage.list_dir(data)) | set(storage.list_files(data))
    return sorted(name for name in names if name.startswith((".parts-", ".attempt-")) or ".tmp-" in name
                  or ".summary-" in name)


@pytest.fixture(scope="module")
def uninterrupted_preprocess(tmp_path_factory):
    """RUN/data of the same `kcp preprocess` run once without a kill: what every rerun must give."""
    run_dir = str(tmp_path_factory.mktemp("preprocess-whole") / "run")
    ok(kcp(QUIET, "preprocess", "--run-dir", run_dir, *PREPROCESS))
    state = data_state(run_dir)
    assert {"metadata.json", "labels.txt", FIRST_SHARD} <= set(state) and len(state) == 5, state
    return state


@pytest.mark.faults
@pytest.mark.parametrize("where, point", [pytest.param(where, point, id=f"{where}-{point}")
                                          for where in ("local", "gcs") for point in PREPROCESS_POINTS])
def test_preprocess_killed_while_writing_shards_or_contract_reruns_to_the_same_data(where, point, tmp_path, request,
                                                                                     uninterrupted_preprocess):
    run_dir, env = _bare_run_dir(where, tmp_path, request, "preprocess")
    layout = RunLayout(run_dir)
    args = ["preprocess", "--run-dir", run_dir, *PREPROCESS]
    killed(kcp(env, *args, kill_at=point))
    seen = data_state(run_dir)
    for name, digest in seen.items():  # whatever a reader finds under a final name is whole
        assert digest == uninterrupted_preprocess[name], name
    if point == "after:metadata.json":
        assert seen == uninterrupted_preprocess
    else:
        assert "metadata.json" not in seen  # no contract: no stage trains on partial data
        if FIRST_SHARD in point:  # the kill landed inside the shard writing: a whole temporary, no final name
            assert FIRST_SHARD not in seen
            assert [name for name in storage.list_files(layout.data)  # in the job's staging folder
                    if name.startswith(".attempt-") and f"/{FIRST_SHARD}.tmp-" in name]
        refused = kcp(env, "train", "--run-dir", run_dir)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("kcp train: error: ") and "metadata.json: not found" in last, last
        assert f"`kcp preprocess --run-dir {run_dir}`" in last, last

    ok(kcp(env, *args))
    assert data_state(run_dir) == uninterrupted_preprocess  # the same contract and byte-identical shards
    assert storage.exists(layout.samples)
    assert data_leftovers(run_dir) == []  # the killed run's parts and temporaries are gone
    assert not storage.exists(storage.join(run_dir, ".kcp-lock"))


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


# `kcp validate` of a copy of digits_run (trained and exported): it writes one file,
# RUN/export/model/VERSION/assets.extra/validation.json, the verdict `kcp serve` (kcp/core/layout.py
# `is_blessed`) and `kcp push` read.
VALIDATE_POINTS = ["before:validation.json", "after:validation.json"]


def _exported_files(run_dir: str) -> list:
    """What `kcp validate` reads of a run: config, data, metrics, model and the export, without
    any verdict or lock an earlier command left."""
    files = []
    for root, _, names in os.walk(run_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), run_dir).replace(os.sep, "/")
            wanted = relative == "config.yaml" or relative.startswith(("data/", "export/")) or \
                relative in ("train/metrics.json", "train/model.keras")
            if wanted and name not in ("validation.json", ".kcp-lock"):
                files.append(relative)
    return sorted(files)


def _copy_local(source: str, destination: str) -> str:
    for relative in _exported_files(source):
        os.makedirs(os.path.dirname(os.path.join(destination, relative)), exist_ok=True)
        shutil.copyfile(os.path.join(source, relative), os.path.join(destination, relative))
    return destination


def _exported_run(where, digits_run, tmp_path, request):
    if where == "local":
        return _copy_local(digits_run, str(tmp_path / "run")), QUIET
    run_dir, env = _bare_run_dir(where, tmp_path, request, "validate")
    bucket = request.getfixturevalue("gcs").bucket("kcp-test")
    prefix = run_dir[len("gs://kcp-test/"):]
    for relative in _exported_files(digits_run):
        bucket.blob(f"{prefix}/{relative}").upload_from_filename(os.path.join(digits_run, relative))
    return run_dir, env


@pytest.fixture(scope="module")
def uninterrupted_validation(digits_run, tmp_path_factory):
    """validation.json of the same `kcp validate` run once without a kill."""
    run_dir = _copy_local(digits_run, str(tmp_path_factory.mktemp("validate-whole") / "run"))
    assert "-> blessed" in ok(kcp(QUIET, "validate", "--run-dir", run_dir))
    return json.loads(storage.read_text(os.path.join(RunLayout(run_dir).version_dir("model"), "assets.extra",
                                                     "validation.json")))


@pytest.mark.faults
@pytest.mark.parametrize("where, point", [pytest.param(where, point, id=f"{where}-{point}")
                                          for where in ("local", "gcs") for point in VALIDATE_POINTS])
def test_validate_killed_at_its_verdict_never_shows_a_partial_or_wrong_blessing(where, point, digits_run, tmp_path,
                                                                                request, uninterrupted_validation):
    from kcp.core.layout import is_blessed as blessed  # what `kcp serve`, `kcp push` and `kcp predict` ask of a version

    run_dir, env = _exported_run(where, digits_run, tmp_path, request)
    layout = RunLayout(run_dir)
    versions = layout.versions("model")
    version = layout.version_dir("model")  # the newest, which `kcp validate` takes
    assets = storage.join(version, "assets.extra")
    verdict = storage.join(assets, "validation.json")
    assert not storage.exists(verdict) and not blessed(version)
    if where == "gcs":  # the files of an export on gs:// are TensorFlow's client's: no digests recorded there
        uninterrupted_validation = {**uninterrupted_validation, "files_sha256": None}

    killed(kcp(env, "validate", "--run-dir", run_dir, kill_at=point))
    if point.startswith("before:"):
        assert not storage.exists(verdict) and not blessed(version)  # not served, not pushed
    else:
        assert json.loads(storage.read_text(verdict)) == uninterrupted_validation and blessed(version)
    assert not [name for name in storage.list_dir(assets) if ".tmp-" in name]

    assert "-> blessed" in ok(kcp(env, "validate", "--run-dir", run_dir))
    assert json.loads(storage.read_text(verdict)) == uninterrupted_validation and blessed(version)
    if point.startswith("before:"):  # validated again and killed before its write: the blessing stays whole
        killed(kcp(env, "validate", "--run-dir", run_dir, kill_at=point))
        assert json.loads(storage.read_text(verdict)) == uninterrupted_validation and blessed(version)
    assert layout.versions("model") == versions  # validate makes no version
    assert not [name for name in storage.list_dir(assets) if ".tmp-" in name]
