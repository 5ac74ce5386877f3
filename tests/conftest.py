"""Shared fixtures: a real digits run (Beam -> TFRecords -> Keras -> SavedModel), made once."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import pytest  # noqa: E402

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
    from kcp.config import load_config
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
