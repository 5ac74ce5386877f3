"""Shared fixtures: a real digits run (Beam -> TFRecords -> Keras -> SavedModel), made once."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import pytest  # noqa: E402

import trainer.models  # noqa: E402,F401  registers the model families, whose keys the config loader validates

# Python's full (generation 2) garbage collections scan every live object, and this process holds
# TensorFlow, Keras and Beam (over a million objects): on 143 trainer and tuning tests they took 14% of
# the time, and Hyperband ran at half its speed alone. With what follows: 374 s -> 308 s. After collection (every module
# imported) and every 25 tests, a full collection runs and the survivors are frozen out of later scans;
# unfreezing first lets what was frozen be freed once it is garbage, so nothing leaks for good.
FREEZE_EVERY = 25
_finished_tests = 0


def _collect_and_freeze():
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session):
    _collect_and_freeze()


def pytest_runtest_teardown(item, nextitem):
    global _finished_tests
    _finished_tests += 1
    if _finished_tests % FREEZE_EVERY == 0:
        _collect_and_freeze()


# In-process Beam for tests: the multi-processing default is exercised by `make demo`
# and by a dedicated test; starting worker processes in every test would only add time.
IN_PROCESS_BEAM = ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A run directory after preprocess, a short training and an export, via the CLI."""
    from kcp import cli

    run_dir = str(tmp_path_factory.mktemp("digits_run"))
    code = cli.main(["run", "--run-dir", run_dir, "--set", "train.epochs=3", "--", *IN_PROCESS_BEAM])
    assert code == 0
    return run_dir


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """A preprocessed digits run directory to train on (no training yet)."""
    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess

    run_dir = str(tmp_path_factory.mktemp("digits_data"))
    run_preprocess(load_config(), run_dir, IN_PROCESS_BEAM)
    return run_dir


def fresh_run(digits_data: str, tmp_path) -> str:
    """A run directory sharing digits_data's preprocessed data, with its own train/."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    os.symlink(os.path.join(digits_data, "data"), run_dir / "data")
    return str(run_dir)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 with bucket `kcp-test`, for the whole session."""
    from tests.gcs import GcsEmulator

    emulator = GcsEmulator(str(tmp_path_factory.mktemp("gcs"))).start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def google_apis(gcs_emulator, tmp_path_factory):
    """An HTTPS proxy playing Google's API hosts in front of the emulator, for TensorFlow's own
    GCS filesystem; its `environment()` is for the subprocesses that use it."""
    from tests.gcs import GoogleApisProxy

    proxy = GoogleApisProxy(str(tmp_path_factory.mktemp("google-apis")), gcs_emulator.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def gcs(gcs_emulator):
    """A google-cloud-storage client for the emulator, with STORAGE_EMULATOR_HOST set in this process."""
    from apache_beam.internal.gcp import auth as beam_auth

    emulator = gcs_emulator
    saved = {key: os.environ.get(key) for key in emulator.environment()}
    os.environ.update(emulator.environment())
    # Google's token server cannot be reached here: Beam's gcsio gets no credentials and
    # falls back to its anonymous google-cloud-storage client, which the emulator accepts.
    saved_auth = (beam_auth._Credentials._credentials_init, beam_auth._Credentials._credentials)
    beam_auth._Credentials._credentials_init, beam_auth._Credentials._credentials = True, None
    try:
        from google.cloud import storage as gcs_storage

        client = gcs_storage.Client(project="test-project")
        yield client
    finally:
        beam_auth._Credentials._credentials_init, beam_auth._Credentials._credentials = saved_auth
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
