"""The pipeline on a real distributed engine: Beam's Dask runner on a LocalCluster on 127.0.0.1."""

import os
import socket

import numpy as np
import pytest
import tensorflow as tf

from kcp.core.config_load import load_config
from kcp.core.beamio import local_runner_defaults
from pipeline.preprocess import run_preprocess
from tests.conftest import IN_PROCESS_BEAM


def count_records(run_dir):
    data = os.path.join(run_dir, "data")
    return {name: sum(1 for _ in tf.data.TFRecordDataset(os.path.join(data, name)))
            for name in sorted(os.listdir(data)) if name.endswith(".tfrecord")}


@pytest.fixture(scope="module")
def dask_cluster():
    from dask.distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None)
    yield cluster.scheduler_address
    cluster.close()


def test_dask_runner_writes_every_record_once_and_the_same_bytes(dask_cluster, tmp_path):
    config = load_config([], ["data.limit=200", "data.num_shards=2", "data.augment.copies=1"])
    dask_dir, local_dir = str(tmp_path / "dask"), str(tmp_path / "local")
    contract = run_preprocess(config, dask_dir, ["--runner", "DaskRunner", f"--dask_client_address={dask_cluster}"])
    run_preprocess(config, local_dir, IN_PROCESS_BEAM)
    counts = count_records(dask_dir)
    assert sum(counts.values()) == sum(info.count for info in contract.splits.values())
    assert sum(counts.values()) == 200 + contract.splits["train"].count // 2  # originals + one copy each in train
    assert counts == count_records(local_dir)
    for name in counts:
        with open(os.path.join(dask_dir, "data", name), "rb") as a, open(os.path.join(local_dir, "data", name), "rb") as b:
            assert a.read() == b.read(), name


def test_a_dask_scheduler_without_a_worker_is_one_line_not_a_silent_wait(tmp_path, capsys, monkeypatch):
    """`dask scheduler &` alone, as operations.md once showed it: the job waited forever, saying nothing."""
    from dask.distributed import LocalCluster

    from kcp import cli
    from kcp.core import beamio

    monkeypatch.setattr(beamio, "DASK_WORKER_WAIT_S", 2.0)
    cluster = LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None)
    try:
        address = cluster.scheduler_address
        capsys.readouterr()
        assert cli.main(["preprocess", "--run-dir", str(tmp_path / "run"), "--", "--runner", "DaskRunner",
                         f"--dask_client_address={address}"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"kcp preprocess: error: Beam options: --dask_client_address {address}: the Dask scheduler there has no "
            f"worker after 2 s; start one (`dask worker {address}`)")
        assert not (tmp_path / "run").exists()
    finally:
        cluster.close()


def test_dask_runner_alias():
    assert local_runner_defaults(["--runner=DaskRunner"]) == ["--runner=apache_beam.runners.dask.dask_runner.DaskRunner"]


def test_runner_options_beam_refuses_are_one_line_and_keep_the_previous_data(digits_data, tmp_path, gcs, capsys,
                                                                               monkeypatch):
    """An unknown runner, a --setup_file not there, Dataflow with a run directory on this machine or
    without its project/region/temp_location: one line (exit 2) before anything in RUN/data is touched."""
    import shutil

    from kcp import cli

    monkeypatch.chdir(tmp_path)  # relative paths below are in tmp_path
    run_dir = str(tmp_path / "run")
    shutil.copytree(digits_data, run_dir)
    before = sorted(os.listdir(os.path.join(run_dir, "data")))
    remote = "gs://kcp-test/runners/run"
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    for run, options, message in (
            (run_dir, ["--runner", "NoSuchRunner"], "Beam options: Unexpected pipeline runner: NoSuchRunner."),
            (run_dir, ["--setup_file", str(tmp_path / "setup.py")],
             f"Beam options: --setup_file {tmp_path / 'setup.py'} is not there"),
            (run_dir, ["--runner", "DataflowRunner", "--project", "p", "--region", "r", "--temp_location", "gs://b/t"],
             f"Beam options: a DataflowRunner job's workers run on other machines and cannot reach {run_dir} on this "
             "one; use gs:// paths"),
            (remote, ["--runner", "DataflowRunner"], "Beam options: Missing GCS path option: temp_location."),
            (run_dir, ["--runner", "DaskRunner", f"--dask_client_address=127.0.0.1:{closed_port}"],
             f"Beam options: --dask_client_address 127.0.0.1:{closed_port}: no Dask scheduler answers there "
             "(Connection refused); start one"),
            ("runs/typo", ["--runner", "DaskRunner", f"--dask_client_address=127.0.0.1:{closed_port}"],  # made absolute
             f"Beam options: --dask_client_address 127.0.0.1:{closed_port}: no Dask scheduler answers there")):
        capsys.readouterr()
        assert cli.main(["preprocess", "--run-dir", run, "--", *options]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith(f"kcp preprocess: error: {message}"), error
    np.savez(tmp_path / "series.npz", x=np.zeros((4, 3, 1), "float32"), y=np.arange(4) % 2)
    # a source given relative to this folder: the cluster's workers cannot resolve it
    assert cli.main(["preprocess", "--run-dir", run_dir, "--source", "npz:series.npz", "--", "--runner", "DaskRunner",
                     "--dask_client_address=127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kcp preprocess: error: Beam options: a Dask cluster's workers resolve series.npz from their own working "
        f"folder; give it as an absolute path ({tmp_path / 'series.npz'}) or a gs:// one")
    assert sorted(os.listdir(os.path.join(run_dir, "data"))) == before  # nothing removed
    assert gcs.bucket("kcp-test").get_blob("runners/run/data/metadata.json") is None
