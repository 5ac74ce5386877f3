"""The pipeline on a real distributed engine: Beam's Dask runner on a LocalCluster on 127.0.0.1."""

import os

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


def test_dask_runner_alias():
    assert local_runner_defaults(["--runner=DaskRunner"]) == ["--runner=apache_beam.runners.dask.dask_runner.DaskRunner"]
