"""Fault injection: kill a stage (SIGKILL, as a preemption does) before or after an artifact
write, rerun the same command, and check that no reader saw a partial or mismatched artifact
and that the rerun ends as an uninterrupted run would.

The kill point is chosen by KCP_KILL_AT (kcp/core/storage.py `fault_point`): "before:NAME" or
"after:NAME[:N]" kills at the N-th write or rename of a file named NAME. Every case is marked
`faults` (run them all with `make test-faults`) except a fixed sample that `make test` runs.
"""

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
