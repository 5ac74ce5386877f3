"""Issue 14: artifacts that a kill, a second process or a bad value cannot leave half-written.

Each test names the guarantee it proves (docs/operations.md, "What we guarantee"); each fails
on the code before the fix. The slow, process-killing cases are marked `faults` (make test-faults).
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

from kcp import api, cli
from kcp.core import storage
from kcp.core.config_load import load_config
from kcp.core.errors import UserError
from kcp.core.layout import RunLayout, export_versions, new_run_dir
from kcp.core.schema import ConfigError
from tests.conftest import IN_PROCESS_BEAM, fresh_run

try:
    from kcp.core import lock as lock_lib
except ImportError:  # before issue 14: these tests fail, not the whole module
    lock_lib = None


# --- config: values that used to pass or crash ----------------------------------------------

@pytest.mark.parametrize("override", ["train.learning_rate=.nan", "model.dropout=.nan",
                                      "data.max_bad_fraction=.nan", "train.learning_rate=.inf"])
def test_non_finite_numbers_are_refused_with_one_line(override):
    with pytest.raises(ConfigError) as error:
        load_config([], [override])
    message = str(error.value)
    assert message.startswith(override.split("=")[0] + ":") and "finite" in message and "\n" not in message


def test_a_split_of_strings_is_a_config_error_not_a_type_error():
    with pytest.raises(ConfigError, match=r"^data\.split: .*three fractions"):
        load_config([], ["data.split=[a, b, c]"])


def test_warmup_requests_is_a_config_key_from_0_to_1000():
    assert load_config().export.warmup_requests == 100
    assert load_config([], ["export.warmup_requests=0"]).export.warmup_requests == 0
    with pytest.raises(ConfigError, match="export.warmup_requests"):
        load_config([], ["export.warmup_requests=1001"])


# --- run names and the run-directory lock ---------------------------------------------------

def test_runs_started_in_the_same_second_get_different_directories(tmp_path):
    root = str(tmp_path / "runs")
    names, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        names.append(new_run_dir(root))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(names)) == 8 and all(os.path.isdir(name) for name in names)


def _holder(run_dir, pid, host=None):
    storage.write_text_atomic(lock_lib.lock_path(run_dir), json.dumps(
        {"command": "train", "user": "someone", "host": host or socket.gethostname(), "pid": pid,
         "started": "2026-11-26T10:00:00Z", "token": "x"}))


def test_a_second_producing_stage_is_refused_with_one_line_naming_the_holder(tmp_path):
    run_dir = str(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(run_dir, sleeper.pid)
        for stage in (lambda: api.preprocess(run_dir, "digits"), lambda: api.train(run_dir),
                      lambda: api.export(run_dir), lambda: api.tune(run_dir)):
            with pytest.raises(lock_lib.RunLockedError) as error:
                stage()
            message = str(error.value)
            assert f"pid {sleeper.pid} on {socket.gethostname()}" in message and "`kcp train`" in message
            assert "\n" not in message
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_process_tf_config_names_a_worker_takes_the_lock_unless_it_trains_in_the_cluster(tmp_path, monkeypatch):
    """Only a multi_worker replica other than the chief (whose chief holds the lock) and a tuner worker
    go without it. A TF_CONFIG worker 1 that preprocesses, or trains alone (another strategy), is a
    producing stage like any other: two such wrote into one run directory at once (a preprocess
    reported success over another's data; two trainings into one RUN/train/)."""
    run_dir = str(tmp_path / "run")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(run_dir, sleeper.pid)
        for stage in (lambda: api.preprocess(run_dir, "digits"),
                      lambda: api.train(run_dir, overrides=["train.strategy=one_device"])):
            with pytest.raises(lock_lib.RunLockedError, match=f"pid {sleeper.pid} on ") as refused:
                stage()
            assert str(refused.value).endswith(" (TF_CONFIG names this process worker 1 of a cluster, but it does not "
                                               "train in it: only train.strategy auto or multi_worker trains with the "
                                               "chief, which holds the lock)")
        with api.locked(run_dir, "train", helper=True):  # a multi_worker non-chief: its chief holds the lock
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    from kcp.core.cluster import is_cluster_helper

    assert is_cluster_helper("multi_worker") and is_cluster_helper("auto")  # a cluster of 2: auto is multi_worker
    assert not is_cluster_helper("one_device") and not is_cluster_helper(None)


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    run_dir = str(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _holder(run_dir, dead.pid)
    with lock_lib.run_lock(run_dir, "export"):
        holder = json.loads(storage.read_text(lock_lib.lock_path(run_dir)))
        assert (holder["command"], holder["pid"]) == ("export", os.getpid())
        with lock_lib.run_lock(run_dir, "train"):  # re-entrant in one process (kcp run)
            pass
        assert storage.exists(lock_lib.lock_path(run_dir))
    assert not storage.exists(lock_lib.lock_path(run_dir))


def test_another_thread_of_the_process_is_refused_like_another_process(tmp_path):
    """A notebook training in a background thread while its main thread preprocesses the same run
    used to get in (the lock was re-entrant for the whole process); the training then failed."""
    run_dir = str(tmp_path / "run")
    errors = []

    def other_thread():
        try:
            with lock_lib.run_lock(run_dir, "preprocess"):
                pass
        except lock_lib.RunLockedError as error:
            errors.append(str(error))

    with lock_lib.run_lock(run_dir, "train"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert storage.exists(lock_lib.lock_path(run_dir))  # the refused thread removed nothing
    assert len(errors) == 1 and "kcp train" in errors[0] and str(os.getpid()) in errors[0], errors
    assert not storage.exists(lock_lib.lock_path(run_dir))


def test_a_lock_left_by_a_killed_process_not_yet_reaped_is_taken_over(tmp_path):
    """A kcp killed by SIGKILL stays a zombie until its parent (a shell, a scheduler) reaps it:
    its pid still answers kill(pid, 0), but it holds nothing, so the rerun need not wait."""
    run_dir = str(tmp_path / "run")
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed.kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # not reaped: wait until the kernel marks it a zombie
            with open(f"/proc/{killed.pid}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.05)
        os.kill(killed.pid, 0)  # the pid still exists
        _holder(run_dir, killed.pid)
        with lock_lib.run_lock(run_dir, "train"):
            assert json.loads(storage.read_text(lock_lib.lock_path(run_dir)))["pid"] == os.getpid()
    finally:
        killed.wait()


def test_a_lock_from_another_host_is_never_broken(tmp_path):
    run_dir = str(tmp_path / "run")
    _holder(run_dir, 1, host="some-other-vm")
    with pytest.raises(lock_lib.RunLockedError, match="some-other-vm.*delete .*kcp-lock"):
        lock_lib.acquire(run_dir, "train")


def test_a_lock_that_is_there_but_cannot_be_read_is_named_with_the_reason(tmp_path, monkeypatch):
    """Credentials that may create objects but not read them (objectCreator): the error says so."""
    run_dir = str(tmp_path / "run")
    _holder(run_dir, 1, host="some-other-vm")

    def forbidden(path):
        raise PermissionError(f"403 GET {path}: caller does not have storage.objects.get access")

    monkeypatch.setattr(storage, "read_bytes", forbidden)
    with pytest.raises(lock_lib.RunLockedError, match=r"kcp-lock is there but cannot be read \(403 GET .*storage"
                                                      r".objects.get access\); if no process holds it, delete it$"):
        lock_lib.acquire(run_dir, "train")


def test_the_lock_on_gcs_is_created_with_a_generation_precondition(gcs):
    run_dir = "gs://kcp-test/reliability/locked"
    first = lock_lib.acquire(run_dir, "train")
    try:
        lock_lib._HELD.clear()  # as if another process: the object exists, so create-if-absent fails
        with pytest.raises(lock_lib.RunLockedError, match=f"pid {os.getpid()}"):
            lock_lib.acquire(run_dir, "export")
    finally:
        lock_lib._HELD[(lock_lib.lock_path(run_dir), threading.get_ident())] = [first, 1]
        lock_lib.release(run_dir)
    assert not storage.exists(lock_lib.lock_path(run_dir))
    assert storage.create_exclusive(f"{run_dir}/x", b"1") and not storage.create_exclusive(f"{run_dir}/x", b"2")
    assert storage.read_bytes(f"{run_dir}/x") == b"1"


# --- storage on gs:// -----------------------------------------------------------------------

def test_gcs_atomic_write_never_deletes_the_target(gcs, monkeypatch):
    path = "gs://kcp-test/reliability/config.yaml"
    storage.write_text_atomic(path, "old")
    backend = storage.backend_for(path)
    deleted = []
    real_delete = backend.fs.delete
    monkeypatch.setattr(backend.fs, "delete", lambda paths: (deleted.extend(paths), real_delete(paths))[1])
    storage.write_text_atomic(path, "new")
    assert path not in deleted and storage.read_text(path) == "new"
    assert [b.name for b in gcs.list_blobs("kcp-test", prefix="reliability/config")] == ["reliability/config.yaml"]


# A command run in a fresh process against a storage service at STORAGE_EMULATOR_HOST, with no
# credentials looked for (as the `gcs` fixture does: Beam's gcsio then uses an anonymous client).
ANONYMOUS_KCP = """
import sys
from apache_beam.internal.gcp import auth
auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
from kcp import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_storage_service_that_refuses_is_one_line_naming_the_object(tmp_path):
    """Credentials without access to the bucket: the real clients get 403 from a loopback server
    playing Cloud Storage, and each command says so in one line (exit 2), not in a traceback."""
    import http.server

    class Refusing(http.server.BaseHTTPRequestHandler):
        def refuse(self):
            body = json.dumps({"error": {"code": 403, "message": "kcp-test@example.iam.gserviceaccount.com does "
                                         "not have storage.objects.get access to the Google Cloud Storage object."}})
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_GET = do_POST = do_PUT = do_DELETE = refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}",
           "GOOGLE_CLOUD_PROJECT": "test-project", "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        for command in (["describe-model"], ["train"]):
            result = subprocess.run([sys.executable, "-c", ANONYMOUS_KCP, *command, "--run-dir", "gs://kcp-test/denied"],
                                    env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert result.returncode == 2, result.stderr[-3000:]
            assert result.stderr.strip().splitlines() == [
                f"kcp {command[0]}: error: Google Cloud: 403 GET {env['STORAGE_EMULATOR_HOST']}/storage/v1/b/"
                "kcp-test/o/denied%2Fconfig.yaml?fields=name&prettyPrint=false: kcp-test@example.iam.gserviceaccount"
                ".com does not have storage.objects.get access to the Google Cloud Storage object.; check the "
                "network and the credentials"], result.stderr[-3000:]
    finally:
        server.shutdown()


def test_storage_failure_names_only_the_storage_clients_errors():
    from google.api_core.exceptions import Forbidden, RetryError

    from kcp.core.remote import storage_failure

    assert storage_failure(Forbidden("GET gs://b/o: denied")) == "Google Cloud: 403 GET gs://b/o: denied"
    try:  # what it was raised from counts: Beam and the trainer wrap the client's errors
        try:
            raise RetryError("Timeout of 120.0s exceeded", OSError("storage.googleapis.com unreachable"))
        except RetryError as cause:
            raise RuntimeError("reading the shards failed") from cause
    except RuntimeError as wrapped:
        assert storage_failure(wrapped) == ("Google Cloud: Timeout of 120.0s exceeded, last exception: "
                                            "storage.googleapis.com unreachable")
    assert storage_failure(ValueError("a bug of ours")) is None and storage_failure(OSError("disk full")) is None
    assert storage_failure(Forbidden("word " * 100)) == "Google Cloud: 403 " + "word " * 79 + "…"  # at a word


# --- model.keras and metrics.json ------------------------------------------------------------

def _tiny_model(bias=0.0):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, bias_initializer=keras.initializers.Constant(bias))])
    model.compile("sgd", "mse")
    return model


def _bias(path):
    return float(keras.saving.load_model(path).layers[-1].get_weights()[1][0])


def test_model_keras_is_replaced_atomically_through_a_unique_temporary(tmp_path, monkeypatch):
    from trainer import outputs

    directory = tmp_path / "runs.keras" / "train"  # ".keras" in a folder name must not be rewritten
    directory.mkdir(parents=True)
    path = str(directory / "model.keras")
    outputs.save_model(_tiny_model(1.0), path)
    renamed = []
    real_rename = storage.rename

    def rename(source, target):
        assert os.path.exists(target) and _bias(target) == 1.0  # the old model stays until the rename
        renamed.append(source)
        real_rename(source, target)

    monkeypatch.setattr(storage, "rename", rename)
    monkeypatch.setattr(storage, "remove", lambda p: pytest.fail(f"removed {p} while saving"))
    outputs.save_model(_tiny_model(2.0), path)
    assert _bias(path) == 2.0
    assert len(renamed) == 1 and renamed[0].startswith(str(directory / "model.tmp-")) and renamed[0].endswith(".keras")
    monkeypatch.undo()

    def killed(source, target):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(storage, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.save_model(_tiny_model(3.0), path)
    assert _bias(path) == 2.0 and os.listdir(directory) == ["model.keras"]  # old model, no temporary left


def test_a_temporary_left_by_a_save_killed_midway_is_removed_by_the_next_save(tmp_path):
    """SIGKILL runs no `finally`: a save killed inside model.save or before its rename leaves its
    model.tmp-*.keras; the rerun's save removes it (and nothing that is not a model temporary)."""
    from trainer import outputs

    directory = tmp_path / "train"
    directory.mkdir()
    (directory / "model.tmp-0123456789ab.keras").write_bytes(b"PK\x03\x04 half a zip")  # a killed save's
    (directory / "history.json").write_text("{}")
    (directory / "other.tmp-0123456789ab.keras").write_bytes(b"not ours")
    outputs.save_model(_tiny_model(4.0), str(directory / "model.keras"))
    assert sorted(os.listdir(directory)) == ["history.json", "model.keras", "other.tmp-0123456789ab.keras"]
    assert _bias(str(directory / "model.keras")) == 4.0


@pytest.mark.parametrize("kill_at", ["model", "metrics"])
def test_a_kill_between_model_and_metrics_never_pairs_them_wrongly(tmp_path, monkeypatch, kill_at):
    from trainer import outputs

    directory = str(tmp_path)
    outputs.save_results(_tiny_model(1.0), directory, directory, json.dumps({"bias": 1.0}))
    if kill_at == "model":
        monkeypatch.setattr(storage, "rename", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        real = storage.write_text_atomic
        monkeypatch.setattr(storage, "write_text_atomic",
                            lambda p, t: (_ for _ in ()).throw(KeyboardInterrupt()) if p.endswith("metrics.json")
                            else real(p, t))
    with pytest.raises(KeyboardInterrupt):
        outputs.save_results(_tiny_model(2.0), directory, directory, json.dumps({"bias": 2.0}))
    monkeypatch.undo()
    metrics = os.path.join(directory, "metrics.json")
    model_bias = _bias(os.path.join(directory, "model.keras"))
    # metrics.json is absent (readers stop with "not found") or describes the model beside it
    assert not os.path.exists(metrics) or json.load(open(metrics))["bias"] == model_bias
    assert model_bias == (1.0 if kill_at == "model" else 2.0)


def test_the_preemption_backup_survives_until_model_and_metrics_are_written(digits_data, tmp_path, monkeypatch):
    from trainer import train as train_lib

    run_dir = fresh_run(digits_data, tmp_path)
    config = load_config([], ["train.epochs=2", "model.filters=[8]", "train.cache=false"])

    def killed(*args):
        raise KeyboardInterrupt("preempted while saving")

    monkeypatch.setattr(train_lib, "save_results", killed)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(config, run_dir)
    monkeypatch.undo()
    backup = os.path.join(run_dir, "train", "backup")
    assert json.load(open(os.path.join(backup, "training_metadata.json")))["epoch"] == 2

    epochs = []
    real_fit = train_lib.Trainer.fit
    monkeypatch.setattr(train_lib.Trainer, "fit", lambda self, model, callbacks=(), **kw: real_fit(
        self, model, [*callbacks, keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs.append(e))],
        **kw))
    metrics = train_lib.train(config, run_dir)
    assert epochs == []  # resumed after the last epoch: nothing retrained
    assert metrics["epochs"] == 2 and os.path.exists(os.path.join(run_dir, "train", "model.keras"))
    assert not os.path.exists(backup)  # removed only once the results are saved


def test_an_interrupted_retrain_leaves_no_model_that_looks_finished(digits_data, tmp_path, monkeypatch):
    """A second train with another learning rate, interrupted after its first epoch: RUN/train/ held its
    history.json and RUN/config.yaml its config beside the first train's model.keras and metrics.json,
    and `kcp export` exported that old model. Now export refuses by name; the rerun resumes and finishes."""
    from trainer import train as train_lib

    run_dir = fresh_run(digits_data, tmp_path)
    layout = RunLayout(run_dir)
    small = ["train.epochs=2", "model.filters=[8]", "train.cache=false"]
    first = api.train(run_dir, "cnn", overrides=small)
    retrain = [*small, "train.learning_rate=0.01"]

    real_fit = train_lib.Trainer.fit

    def interrupt(epoch, logs):
        raise KeyboardInterrupt("SIGINT after the first epoch")

    monkeypatch.setattr(train_lib.Trainer, "fit", lambda self, model, callbacks=(), **kw: real_fit(
        self, model, [*callbacks, keras.callbacks.LambdaCallback(on_epoch_end=interrupt)], **kw))
    with pytest.raises(KeyboardInterrupt):
        api.train(run_dir, overrides=retrain)
    monkeypatch.undo()
    assert len(json.loads(storage.read_text(layout.history))["loss"]) == 1  # the new training's history
    assert not storage.exists(layout.model) and not storage.exists(layout.metrics)
    with pytest.raises(UserError, match=r"train holds no finished model: the last kcp train did not finish \(killed, "
                                        r"or stopped by an error such as a NaN loss\); rerun it") as error:
        api.export(run_dir)
    assert "\n" not in str(error.value) and layout.train in str(error.value)
    assert not export_versions(layout.export_root("model"))

    epochs = []
    monkeypatch.setattr(train_lib.Trainer, "fit", lambda self, model, callbacks=(), **kw: real_fit(
        self, model, [*callbacks, keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs.append(e))],
        **kw))
    second = api.train(run_dir, overrides=retrain)
    monkeypatch.undo()
    assert epochs == [1]  # the same unfinished training: resumed after its first epoch
    assert second.metrics["epochs"] == 2 and second.metrics["weights_sha256"] != first.metrics["weights_sha256"]
    version = api.export(run_dir)
    from deploy.export import FINGERPRINT

    exported = json.loads(storage.read_text(os.path.join(version, "assets.extra", FINGERPRINT)))
    assert exported["weights_sha256"] == second.metrics["weights_sha256"]  # the retrained model, not the old one


# --- export: version numbers, order of files, warmup -----------------------------------------

def _fake_version(directory, complete=True):
    os.makedirs(os.path.join(directory, "variables"), exist_ok=True)
    open(os.path.join(directory, "variables", "variables.index"), "wb").write(b"i")
    if complete:
        open(os.path.join(directory, "saved_model.pb"), "wb").write(b"pb")


def test_a_local_export_never_takes_a_version_another_export_published(tmp_path, monkeypatch):
    from deploy import export as export_lib

    layout = RunLayout(str(tmp_path))
    _fake_version(os.path.join(layout.export_root("model"), "1"))
    mine = os.path.join(layout.export_root("model"), ".tmp-mine")
    _fake_version(mine)
    answers = iter([1])  # a racing export saw version 1 free, as both did before it was published
    real = RunLayout.next_version
    monkeypatch.setattr(RunLayout, "next_version", lambda self, name: next(answers, None) or real(self, name))
    assert export_lib._publish_local(layout, "model", mine) == os.path.join(layout.export_root("model"), "2")
    assert open(os.path.join(layout.export_root("model"), "1", "saved_model.pb"), "rb").read() == b"pb"
    assert layout.versions("model") == [1, 2]


def test_gcs_export_claims_its_version_atomically_and_copies_saved_model_pb_last(gcs, tmp_path, monkeypatch):
    from deploy import export as export_lib

    layout = RunLayout("gs://kcp-test/reliability/export-claims")
    copied = []
    monkeypatch.setattr(export_lib, "copy_tree", lambda source, target: copied.append(target))
    answers = iter([1, 1])  # two exports computing the same next version at the same time
    real = RunLayout.next_version
    monkeypatch.setattr(RunLayout, "next_version", lambda self, name: next(answers, None) or real(self, name))
    first = export_lib._publish_remote(layout, "model", str(tmp_path))
    second = export_lib._publish_remote(layout, "model", str(tmp_path))
    assert (first, second) == (f"{layout.root}/export/model/1", f"{layout.root}/export/model/2")
    monkeypatch.undo()

    source = str(tmp_path / "saved")
    _fake_version(source)
    os.makedirs(os.path.join(source, "assets.extra"))
    open(os.path.join(source, "assets.extra", "labels.txt"), "w").write("a\n")
    order = []
    import tensorflow as tf

    monkeypatch.setattr(tf.io.gfile, "copy", lambda src, dst, overwrite: order.append(os.path.relpath(src, source)))
    monkeypatch.setattr(tf.io.gfile, "makedirs", lambda path: None)
    export_lib.copy_tree(source, "gs://kcp-test/reliability/copy")
    assert order[-1] == "saved_model.pb" and len(order) == 3


def test_versions_without_saved_model_pb_are_not_versions(tmp_path):
    root = str(tmp_path / "export" / "model")
    _fake_version(os.path.join(root, "1"))
    _fake_version(os.path.join(root, "2"), complete=False)  # an export to gs:// killed halfway
    assert export_versions(root) == [1]
    assert RunLayout(str(tmp_path)).next_version("model") == 3  # and its number is not reused


def test_warmup_requests_zero_writes_no_warmup_file(digits_run, tmp_path):
    import tensorflow as tf

    from deploy.export import export_for_serving

    run_dir = str(tmp_path / "run")
    os.makedirs(os.path.join(run_dir, "train"))
    os.symlink(os.path.join(digits_run, "data"), os.path.join(run_dir, "data"))
    for name in ("model.keras", "metrics.json"):  # a finished training: the model with its metrics
        shutil.copy(os.path.join(digits_run, "train", name), os.path.join(run_dir, "train", name))
    none = export_for_serving(load_config([], ["export.warmup_requests=0"]), run_dir)
    assert not os.path.exists(os.path.join(none, "assets.extra", "tf_serving_warmup_requests"))
    three = export_for_serving(load_config([], ["export.warmup_requests=3"]), run_dir)
    assert len(list(tf.data.TFRecordDataset(os.path.join(three, "assets.extra", "tf_serving_warmup_requests")))) == 3
    assert RunLayout(run_dir).versions("model") == [1, 2]


# --- validate and push ------------------------------------------------------------------------

def test_validate_with_an_empty_test_split_is_a_one_line_error(digits_run, monkeypatch):
    from deploy import validate as validate_lib
    from kcp.core import contract as contract_lib

    real = contract_lib.read_contract

    def no_test(run_dir):
        contract = real(run_dir)
        return type(contract)(**{**contract.__dict__, "splits": {k: v for k, v in contract.splits.items()
                                                                  if k != "test"}})

    monkeypatch.setattr(contract_lib, "read_contract", no_test)
    with pytest.raises(UserError, match="test split is empty"):
        validate_lib.validate_export(load_config(), digits_run)


def _upload_version(gcs, prefix, blessed=True, complete=True):
    bucket = gcs.bucket("kcp-test")
    files = {"variables/variables.index": b"i", "variables/variables.data-00000-of-00001": b"d",
             "assets.extra/validation.json": json.dumps({"blessed": blessed, "reasons": []}).encode()}
    if complete:
        files["saved_model.pb"] = b"pb"
    for name, content in files.items():
        bucket.blob(f"{prefix}/{name}").upload_from_string(content)


def test_push_from_a_gcs_run_directory_and_resume_after_a_killed_push(gcs):
    from deploy.push import push_export

    _upload_version(gcs, "reliability/run/export/model/4")
    version_dir = "gs://kcp-test/reliability/run/export/model/4"
    # a push killed halfway left files but no saved_model.pb: pushing again completes it
    _upload_version(gcs, "reliability/served/4", complete=False)
    written = push_export(version_dir, "gs://kcp-test/reliability/served", client=gcs)
    assert written[-1] == "gs://kcp-test/reliability/served/4/saved_model.pb" and len(written) == 4
    assert gcs.bucket("kcp-test").blob("reliability/served/4/saved_model.pb").download_as_bytes() == b"pb"
    with pytest.raises(UserError, match="already exists"):  # a complete version is never overwritten
        push_export(version_dir, "gs://kcp-test/reliability/served", client=gcs)


def test_push_from_a_local_directory_reads_validation_through_storage(tmp_path, gcs):
    from deploy.push import push_export

    version_dir = str(tmp_path / "export" / "model" / "1")
    _fake_version(version_dir)
    os.makedirs(os.path.join(version_dir, "assets.extra"))
    storage.write_text_atomic(os.path.join(version_dir, "assets.extra", "validation.json"),
                              json.dumps({"blessed": False, "reasons": ["too low"]}))
    with pytest.raises(UserError, match="not blessed \\(too low\\)"):
        push_export(version_dir, "gs://kcp-test/reliability/local", client=gcs)
    written = push_export(version_dir, "gs://kcp-test/reliability/local", force=True, client=gcs)
    assert written[-1].endswith("/1/saved_model.pb") and len(written) == 3


def _blessed_version(directory, content: bytes, accuracy=None, contract=None):
    """A version folder kcp validate blessed (with `accuracy`, its test accuracy, and `contract`, the
    sha256 of the data contract in its kcp_fingerprint.json)."""
    os.makedirs(os.path.join(directory, "variables"))
    os.makedirs(os.path.join(directory, "assets.extra"))
    for relative in ("variables/variables.index", "variables/variables.data-00000-of-00001", "saved_model.pb"):
        with open(os.path.join(directory, *relative.split("/")), "wb") as handle:
            handle.write(content + relative.encode())
    with open(os.path.join(directory, "assets.extra", "validation.json"), "w") as handle:
        json.dump({"blessed": True, "reasons": [], **({"export_accuracy": accuracy} if accuracy else {})}, handle)
    if contract:
        with open(os.path.join(directory, "assets.extra", "kcp_fingerprint.json"), "w") as handle:
            json.dump({"contract_sha256": contract, "weights_sha256": content.hex()}, handle)


def _push(version_dir, destination, gcs):
    from deploy.push import push_export

    return push_export(version_dir, destination, client=gcs)


def test_two_pushes_to_one_version_at_once_leave_one_whole_version(tmp_path, gcs, google_apis):
    """Two processes push different models as version 1 of one destination: one wins, whole; the
    other fails with a line naming why (the destination's lock, or the version it finds complete)."""
    sources = {}
    for name in ("a", "b"):
        sources[name] = str(tmp_path / name / "export" / "model" / "1")
        _blessed_version(sources[name], name.encode() * 64)
    go = tmp_path / "go"
    # both start together (they wait for the file `go`) and each upload takes 0.3 s: the pushes overlap
    code = ("import os, sys, time\nfrom google.cloud.storage import Blob\n"
            "from deploy.push import push_export\nfrom kcp.core.errors import UserError\n"
            "upload = Blob.upload_from_filename\n"
            "Blob.upload_from_filename = lambda self, *a, **k: (time.sleep(0.3), upload(self, *a, **k))[1]\n"
            "open(sys.argv[1] + '.ready', 'w').close()\n"
            "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.01)\n"
            "try:\n    push_export(sys.argv[1], 'gs://kcp-test/reliability/race')\n"
            "except UserError as error:\n    print(error); sys.exit(2)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    processes = [subprocess.Popen([sys.executable, "-c", code, path, str(go)], cwd=root, env={**os.environ, **google_apis.environment()},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for path in sources.values()]
    deadline = time.time() + 120
    while not all(os.path.exists(path + ".ready") for path in sources.values()) and time.time() < deadline:
        time.sleep(0.05)  # both have imported and wait
    go.write_text("")
    results = [(process.wait(timeout=120), process.stdout.read()) for process in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(output for code, output in results if code == 2)
    assert "in use by `kcp push`" in loser, loser
    bucket = gcs.bucket("kcp-test")
    pushed = {blob.name.split("/1/", 1)[1]: blob.download_as_bytes()
              for blob in bucket.list_blobs(prefix="reliability/race/1/")}
    assert len(pushed) == 4 and not list(bucket.list_blobs(prefix="reliability/race/.kcp-push-1/"))  # lock gone
    winner = pushed["saved_model.pb"][:1].decode()
    for relative, content in pushed.items():  # every file from the winner: no mix of the two models
        if relative != "assets.extra/validation.json":
            assert content == winner.encode() * 64 + relative.encode(), relative


def test_a_push_into_a_version_another_push_holds_fails_at_once(tmp_path, gcs):
    version_dir = str(tmp_path / "export" / "model" / "3")
    _blessed_version(version_dir, b"x")
    holder = {"command": "push", "user": "someone", "host": socket.gethostname(), "pid": os.getpid(),
              "started": "2026-11-28T00:00:00Z", "token": "other"}  # a live process on this host
    gcs.bucket("kcp-test").blob("reliability/held/.kcp-push-3/.kcp-lock").upload_from_string(json.dumps(holder))
    with pytest.raises(UserError, match=r"reliability/held/\.kcp-push-3 is in use by `kcp push`"):
        _push(version_dir, "gs://kcp-test/reliability/held", gcs)
    assert not list(gcs.bucket("kcp-test").list_blobs(prefix="reliability/held/3/"))


def test_a_push_whose_lock_cannot_be_removed_still_succeeds(tmp_path, gcs, monkeypatch, caplog):
    """Credentials that may create but not delete (a retention policy): the version is whole, so the
    push succeeds and says which lock to delete."""
    from google.api_core.exceptions import Forbidden

    from kcp.core import lock as lock_lib

    version_dir = str(tmp_path / "export" / "model" / "5")
    _blessed_version(version_dir, b"x")

    def forbidden(path):
        raise Forbidden("DELETE: Object is subject to bucket's retention policy")

    monkeypatch.setattr(lock_lib, "release", forbidden)
    written = _push(version_dir, "gs://kcp-test/reliability/kept", gcs)
    assert written[-1] == "gs://kcp-test/reliability/kept/5/saved_model.pb"
    assert "could not remove the lock gs://kcp-test/reliability/kept/.kcp-push-5/.kcp-lock" in caplog.text


def test_push_to_a_missing_bucket_or_with_a_broken_validation_record_is_one_line(tmp_path, gcs):
    version_dir = str(tmp_path / "export" / "model" / "1")
    _blessed_version(version_dir, b"x")
    with pytest.raises(UserError, match="does bucket 'no-such-bucket' exist"):
        _push(version_dir, "gs://no-such-bucket/models", gcs)
    with open(os.path.join(version_dir, "assets.extra", "validation.json"), "w") as handle:
        handle.write('{"blessed": tr')  # cut short
    with pytest.raises(UserError, match="validation.json: not valid JSON .*run `kcp validate` again"):
        _push(version_dir, "gs://kcp-test/reliability/broken", gcs)


def test_a_push_that_would_land_below_a_served_version_is_refused_unless_placed_by_number(tmp_path, gcs):
    """TF Serving serves the highest version: a newer run's version 1 pushed beside another run's 3
    would never be served. --dest-version next puts it above; a number places it where asked."""
    from deploy.push import push_export

    base = "gs://kcp-test/reliability/versions"
    older, newer = str(tmp_path / "a" / "export" / "model" / "3"), str(tmp_path / "b" / "export" / "model" / "1")
    _blessed_version(older, b"older")
    _blessed_version(newer, b"newer")
    assert push_export(older, base, client=gcs)[-1] == f"{base}/3/saved_model.pb"
    with pytest.raises(UserError, match=rf"^--to: {base} holds version 3, above this export's 1: TF Serving "
                                        r"serves the highest.*--dest-version next \(4\)"):
        push_export(newer, base, client=gcs)
    assert not list(gcs.list_blobs("kcp-test", prefix="reliability/versions/1/"))  # nothing written
    assert push_export(newer, base, client=gcs, dest_version="next")[-1] == f"{base}/4/saved_model.pb"
    assert gcs.bucket("kcp-test").blob("reliability/versions/4/saved_model.pb").download_as_bytes() == \
        b"newersaved_model.pb"
    assert push_export(newer, base, client=gcs, dest_version=2)[-1] == f"{base}/2/saved_model.pb"  # below, as asked
    with pytest.raises(UserError, match=r"versions/4/ already exists; versions are never overwritten .push with "
                                        r"--dest-version next"):
        push_export(newer, base, client=gcs, dest_version=4)
    with pytest.raises(UserError, match=r"^--dest-version: expected a version number from 1, or next; got 0$"):
        push_export(newer, base, client=gcs, dest_version=0)
    assert push_export(newer, "gs://kcp-test/reliability/fresh", client=gcs, dest_version="next")[-1].endswith(
        "/fresh/1/saved_model.pb")  # next with none there: the export's own number
    with pytest.raises(UserError, match=r"^--to: 'Bad Bucket' is not a bucket name"):
        push_export(newer, "gs://Bad Bucket/x", client=gcs)
    with pytest.raises(UserError, match=r"^--to: None is not a gs://BUCKET/PATH URI$"):
        push_export(newer, None, client=gcs)


def test_a_push_that_would_replace_a_better_model_of_the_same_data_is_refused_unless_forced(tmp_path, gcs):
    """kcp validate refuses a worse retrain within one run directory; a retrain in a new run pushed
    above the served version (--dest-version next, as the refusal of a lower number says) was not
    compared with anything, and a server there swapped a 0.99 model for a 0.82 one."""
    from deploy.push import push_export

    base = "gs://kcp-test/reliability/regression"
    versions = {name: str(tmp_path / name / "export" / "model" / "1") for name in ("served", "worse", "close", "other")}
    _blessed_version(versions["served"], b"served", accuracy=0.99, contract="digits")
    _blessed_version(versions["worse"], b"worse", accuracy=0.82, contract="digits")
    _blessed_version(versions["close"], b"close", accuracy=0.985, contract="digits")
    _blessed_version(versions["other"], b"other", accuracy=0.50, contract="letters")  # another test split
    assert push_export(versions["served"], base, client=gcs, max_regression=0.01)[-1] == f"{base}/1/saved_model.pb"
    with pytest.raises(UserError) as refused:
        push_export(versions["worse"], base, client=gcs, dest_version="next", max_regression=0.01)
    assert str(refused.value) == (
        f"--to: {base}/1/, the version a server there serves, scored test accuracy 0.9900 on the same data; this "
        "export scored 0.8200, more than export.max_regression (0.01) below, and would replace it; push a better "
        "model, or --force to push it anyway")
    assert not list(gcs.list_blobs("kcp-test", prefix="reliability/regression/2/"))
    assert push_export(versions["close"], base, client=gcs, dest_version="next", max_regression=0.01)[-1] \
        == f"{base}/2/saved_model.pb"  # within the noise allowed
    with pytest.raises(UserError, match=r"regression/2/, the version a server there serves, scored test accuracy "
                                        r"0\.9850"):
        push_export(versions["worse"], base, client=gcs, dest_version="next", max_regression=0.01)
    assert push_export(versions["worse"], base, client=gcs, dest_version="next", max_regression=None)[-1] \
        == f"{base}/3/saved_model.pb"  # export.max_regression: null compares nothing
    assert push_export(versions["other"], base, client=gcs, dest_version="next", max_regression=0.01)[-1] \
        == f"{base}/4/saved_model.pb"  # 0.50 under 0.82, but on another data contract: not comparable
    assert push_export(versions["served"], f"{base}-forced", client=gcs)[-1].endswith("-forced/1/saved_model.pb")
    assert push_export(versions["worse"], f"{base}-forced", client=gcs, dest_version="next", force=True,
                       max_regression=0.01)[-1].endswith("-forced/2/saved_model.pb")


# --- fingerprints: what an artifact was made from ---------------------------------------------

def _run_from(digits_run, tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(os.path.join(run_dir, "train"))
    os.symlink(os.path.join(digits_run, "data"), os.path.join(run_dir, "data"))
    for name in ("model.keras", "metrics.json"):
        shutil.copy(os.path.join(digits_run, "train", name), os.path.join(run_dir, "train", name))
    return run_dir


def test_export_refuses_a_contract_the_model_was_not_trained_on_and_validate_another_model(digits_run, tmp_path):
    from deploy.export import FINGERPRINT, export_for_serving
    from deploy.validate import validate_export

    run_dir = _run_from(digits_run, tmp_path)
    layout = RunLayout(run_dir)
    metrics = json.loads(storage.read_text(layout.metrics))
    assert metrics["contract_sha256"] == storage.sha256(layout.metadata)
    version = export_for_serving(load_config([], ["export.warmup_requests=1"]), run_dir)
    fingerprint = json.loads(storage.read_text(os.path.join(version, "assets.extra", FINGERPRINT)))
    assert fingerprint == {"contract_sha256": metrics["contract_sha256"], "weights_sha256": metrics["weights_sha256"]}

    storage.write_text_atomic(layout.metrics, json.dumps({**metrics, "weights_sha256": "retrained"}))
    with pytest.raises(UserError, match="exported from another model.*kcp export"):
        validate_export(load_config(), run_dir)
    storage.write_text_atomic(layout.metrics, json.dumps({**metrics, "contract_sha256": "preprocessed-again"}))
    with pytest.raises(UserError, match="trained on another data contract.*kcp train"):
        export_for_serving(load_config(), run_dir)

    # preprocessed again after the export: validate refuses, and the version keeps the blessing it had
    storage.write_text_atomic(layout.metrics, json.dumps(metrics))
    assert validate_export(load_config(), run_dir)["blessed"]
    record = os.path.join(version, "assets.extra", "validation.json")
    blessed = storage.read_text(record)
    os.remove(os.path.join(run_dir, "data"))
    shutil.copytree(os.path.join(digits_run, "data"), os.path.join(run_dir, "data"))
    with open(layout.metadata, "a") as handle:
        handle.write("\n")  # another contract, as far as its hash goes
    with pytest.raises(UserError, match="exported with another data contract.*kcp train"):
        validate_export(load_config(), run_dir)
    assert storage.read_text(record) == blessed


def test_validate_refuses_a_regression_against_the_blessed_version_and_push_a_version_changed_since(
        digits_run, tmp_path, monkeypatch, gcs):
    from deploy import validate as validate_lib
    from deploy.export import export_for_serving
    from deploy.push import push_export

    run_dir = _run_from(digits_run, tmp_path)
    config = load_config([], ["export.warmup_requests=1"])
    first = export_for_serving(config, run_dir)
    result = validate_lib.validate_export(config, run_dir)
    assert result["blessed"] and result["baseline_version"] is None  # nothing blessed before it
    assert set(result["files_sha256"]) >= {"saved_model.pb", "variables/variables.index"}
    assert "assets.extra/validation.json" not in result["files_sha256"]
    second = export_for_serving(config, run_dir)
    real = validate_lib.export_accuracy
    better = result["export_accuracy"] + 0.05  # as if version 1 had been the better model

    def accuracy(export, run, split="test"):  # the baseline by its directory; the validated version loaded
        return better if isinstance(export, str) and export.rstrip("/").endswith("/1") else real(export, run, split)

    monkeypatch.setattr(validate_lib, "export_accuracy", accuracy)
    result = validate_lib.validate_export(config, run_dir)
    assert not result["blessed"] and (result["baseline_version"], result["baseline_accuracy"]) == (1, better)
    assert result["reasons"] == [f"export accuracy {result['export_accuracy']:.4f} is below blessed version 1's "
                                 f"{better:.4f} on the same test split by more than export.max_regression 0.01"]
    assert validate_lib.validate_export(load_config([], ["export.max_regression=null"]), run_dir)["blessed"]
    monkeypatch.undo()

    # a blessed version whose files changed after validation is not pushed, nor predicted with
    with open(os.path.join(second, "variables", "variables.data-00000-of-00001"), "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(UserError, match=r"variables.data-00000-of-00001: changed since `kcp validate` validated this "
                                        r"version .its sha256 differs from validation.json's.; export and validate"):
        push_export(second, "gs://kcp-test/reliability/changed", client=gcs)
    assert not list(gcs.list_blobs("kcp-test", prefix="reliability/changed/"))
    assert cli.main(["predict", "--run-dir", run_dir, "--input", "digits", "--output", str(tmp_path / "p"), "--",
                     *IN_PROCESS_BEAM]) == 2
    assert push_export(first, "gs://kcp-test/reliability/changed", client=gcs)  # the unchanged one goes
    with pytest.raises(UserError, match=r"cannot load the SavedModel .* export it again"):
        validate_lib.validate_export(config, run_dir)  # a truncated variables file: one line, not a traceback
    record = json.loads(storage.read_text(os.path.join(second, "assets.extra", "validation.json")))
    assert not record["blessed"] and "cannot load the SavedModel" in record["reasons"][0]  # its blessing withdrawn


def test_a_backup_made_for_another_model_or_schedule_is_discarded_not_restored(tmp_path):
    from trainer.callbacks import AtomicBackupAndRestore

    x = np.random.RandomState(0).rand(16, 2).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    backup = str(tmp_path / "backup")

    def fit(units, epochs, schedule_steps=None):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(units)])
        rate = keras.optimizers.schedules.CosineDecay(0.1, schedule_steps) if schedule_steps else 0.1
        model.compile(keras.optimizers.SGD(rate), "mse")
        epochs_run = []
        model.fit(x, y[:, :1].repeat(units, axis=1), epochs=epochs, verbose=0, callbacks=[
            AtomicBackupAndRestore(backup, delete_checkpoint=False),
            keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs_run.append(e))])
        return epochs_run

    assert fit(1, 3) == [0, 1, 2]
    assert fit(1, 4) == [3]  # the same model and schedule: resumed (more epochs asked for)
    assert fit(2, 4) == [0, 1, 2, 3]  # another model (a new contract's classes): a shape error before
    assert fit(2, 2) == [0, 1]  # fewer epochs than the backup holds: a silent no-op fit before
    assert fit(2, 3, schedule_steps=6) == [0, 1, 2]
    assert fit(2, 4, schedule_steps=8) == [0, 1, 2, 3]  # another schedule (epochs changed)


def test_tune_refuses_to_resume_a_search_made_for_another_model_or_data(tmp_path):
    from tuning.search import check_fingerprint

    run_dir = str(tmp_path)
    storage.write_text_atomic(RunLayout(run_dir).metadata, '{"contract": 1}')
    check_fingerprint(load_config([], ["model.name=cnn"]), run_dir)
    check_fingerprint(load_config([], ["model.name=cnn", "tune.max_trials=50"]), run_dir)  # a longer search resumes
    with pytest.raises(UserError, match=r"another model section; .*delete .*tuning") as error:
        check_fingerprint(load_config([], ["model.name=resnet"]), run_dir)
    assert "\n" not in str(error.value)
    storage.write_text_atomic(RunLayout(run_dir).metadata, '{"contract": 2}')  # preprocessed again
    with pytest.raises(UserError, match="another data contract"):
        check_fingerprint(load_config([], ["model.name=cnn"]), run_dir)


def test_kcp_run_summarises_a_run_whose_test_split_is_empty(monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    from kcp.cli import commands

    metrics = {"train": {"accuracy": 0.9}, "validation": {"accuracy": 0.8}, "model": "cnn", "params": 10,
               "epochs": 1, "examples_per_second": 5.0, "wall_seconds": 1.0}
    contract = SimpleNamespace(source="digits", modality="image", splits={"train": SimpleNamespace(count=9),
                                                                          "validation": SimpleNamespace(count=1)},
                               bad_examples=0)
    monkeypatch.setattr(api, "preprocess", lambda *a, **k: contract)
    trained = api.TrainResult(metrics=metrics, history={}, model_path=str(tmp_path / "train" / "model.keras"),
                              train_dir=str(tmp_path / "train"))
    monkeypatch.setattr(api, "train", lambda *a, **k: trained)
    monkeypatch.setattr(api, "export", lambda *a, **k: "EXPORT")
    monkeypatch.setattr(api, "reloaded_accuracy", lambda export_dir, run_dir, split: {"validation": 0.8}[split])
    monkeypatch.setattr(commands, "report", lambda *a: 0)
    args = SimpleNamespace(source=None, model=None, config=None, overrides=[])
    config = load_config()
    assert commands.run(args, str(tmp_path), config, []) == 0
    out = capsys.readouterr().out
    assert "export validation accuracy 0.8000" in out and "the test split is empty" in out


def test_a_process_that_never_seeded_tensorflow_gets_back_no_seed_and_no_op_determinism():
    """TensorFlow has no seed state until the first tf.random.set_seed: keeping the caller's state
    must work then (a fresh `kcp tune` process), and leave TensorFlow unseeded; op determinism
    (train.deterministic) is turned off again."""
    script = ("import tensorflow as tf, keras\n"
              "from tensorflow.python.eager import context\n"
              "from trainer.global_state import caller_state_kept\n"
              "with caller_state_kept():\n"
              "    keras.utils.set_random_seed(3)\n"
              "    tf.config.experimental.enable_op_determinism()  # train.deterministic\n"
              "    print('seeded', context.global_seed())\n"
              "from tensorflow.python.framework import config\n"
              "print('after', context.global_seed(), config.is_op_determinism_enabled())\n"
              "tf.random.uniform([])  # unseeded: refused while op determinism is on\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-3:] == ["seeded 3", "after None False", ""]


def test_train_gives_a_notebook_back_its_dtype_policy_and_random_generators(digits_data, tmp_path):
    """train sets the global policy (train.precision) and seeds random/NumPy (train.seed): a notebook's
    own layers and draws afterwards must be as if it had not trained."""
    import tensorflow as tf

    run_dir = fresh_run(digits_data, tmp_path)
    keras.config.set_dtype_policy("float32")

    def seeded_draws():
        keras.utils.set_random_seed(7)  # random, NumPy, Keras' global seed, TensorFlow's global seed
        keras.random.uniform([]), tf.random.uniform([])  # draws before training: those after it continue them
        random.seed(123)
        np.random.seed(123)

    def draws():
        return (random.random(), np.random.rand(), float(keras.random.uniform([])), float(tf.random.uniform([])))

    seeded_draws()
    expected = draws()
    seeded_draws()
    api.train(run_dir, "cnn", overrides=["train.epochs=1", "model.filters=[8]", "train.precision=mixed_bfloat16"])
    assert keras.config.dtype_policy().name == "float32"
    assert draws() == expected


def test_a_write_failure_is_found_and_named_by_the_file_the_user_knows():
    from kcp.core.errors import write_failure

    with pytest.raises(OSError) as full:  # a real full device: every write to /dev/full fails with ENOSPC
        with open("/dev/full", "w") as handle:
            handle.write("x")
    assert write_failure(full.value) == "no space left on its device; free some, or write elsewhere (--run-dir, " \
                                        "--output, TMPDIR)"
    read_only = OSError(30, "Read-only file system", "runs/r/.kcp-lock.tmp-06e479ac")
    assert write_failure(read_only) == ("cannot write runs/r/.kcp-lock: read-only file system; give a --run-dir (or "
                                        "--output) that can be written")
    saving = OSError(28, "No space left on device", "runs/r/train/model.tmp-0123456789ab.keras")  # trainer/outputs.py
    assert write_failure(saving).startswith("cannot write runs/r/train/model.keras: no space left")
    try:  # h5py names the file inside its message; found through what it was raised while handling
        try:
            raise OSError(28, "Unable to synchronously create file (unable to open file: name = "
                              "'runs/r/train/model.keras', errno = 28, error message = 'No space left on device')")
        except OSError:
            raise RuntimeError("saving failed")
    except RuntimeError as error:
        assert write_failure(error).startswith("cannot write runs/r/train/model.keras: no space left on its device")
    # Python's OSError inside Beam's error, and TensorFlow's, name the file in their text
    beam = RuntimeError("OSError: [Errno 28] No space left on device: 'r/data/.attempt-1/train.tmp-0123456789ab' "
                        "[while running 'WriteTrain/WriteParts']")
    assert write_failure(beam).startswith("cannot write r/data/.attempt-1/train: no space left")
    tensorflow = RuntimeError("RESOURCE_EXHAUSTED: r/export/model/.tmp-1a2b3c4d/variables/variables.index; No space "
                              "left on device")
    assert write_failure(tensorflow).startswith("cannot write r/export/model/variables/variables.index: no space")
    assert write_failure(PermissionError(13, "Permission denied", "/data/x.png")) == "/data/x.png: permission denied"
    assert write_failure(FileNotFoundError(2, "No such file or directory", "x")) is None
    assert write_failure(ValueError("a bug")) is None


def test_a_file_that_cannot_be_written_mid_training_is_one_line_and_the_rerun_completes(digits_data, tmp_path):
    """A full disk as the backup's weights file is written: h5py's file let go crashed the interpreter
    (exit 139) or printed about 40 lines of its finalizers' tracebacks around a 46-line traceback. The
    process's file-size limit fails that write as a full disk does (EFBIG for ENOSPC), without root."""
    import resource
    import signal

    run_dir = fresh_run(digits_data, tmp_path)
    kcp = os.path.join(os.path.dirname(sys.executable), "kcp")

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))

    command = [kcp, "train", "--run-dir", run_dir, "--set", "train.epochs=2"]
    failed = subprocess.run(command, preexec_fn=limited, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2, failed.stderr[-3000:]
    backup = os.path.join(run_dir, "train", "backup", "epoch00001-batch000000.weights.h5")
    assert failed.stderr.splitlines()[-1] == (f"kcp train: error: cannot write {backup}: file too large for this "
                                              "process's limit (ulimit -f)"), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and "h5py" not in failed.stderr
    assert not os.path.exists(RunLayout(run_dir).model)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(storage.read_text(RunLayout(run_dir).metrics))["epochs"] == 2
