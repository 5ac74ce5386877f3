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
