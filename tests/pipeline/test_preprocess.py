import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from kcp.core.config_load import load_config
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core.beamio import local_runner_defaults
from kcp.core.sources import SourceError, digits_to_uint8, plan_source
from pipeline import shards, splits
from pipeline.preprocess import drops_finish_bundle_outputs, run_preprocess
from tests.conftest import IN_PROCESS_BEAM


def read_records(data_dir: str, pattern: str, compression: str = "") -> list[bytes]:
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, pattern)))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type=compression)]


@pytest.fixture(scope="module")
def digits_contract(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("pre"))
    config = load_config([], ["data.num_shards=2"])
    return run_dir, run_preprocess(config, run_dir, IN_PROCESS_BEAM)


def test_the_samples_figure_reads_the_train_shard_without_tensorflow(digits_contract):
    """collect_samples (plain Python) gives the train shard's first examples as parse_examples does."""
    from pipeline.samples import collect_samples

    run_dir, contract = digits_contract
    groups = collect_samples(contract, run_dir, rows=4)
    first_shard = contract.split_files(contract_lib.data_dir(run_dir), "train")[0]
    parsed = [(key.decode(), image) for inputs, _, keys in
              [example_lib.parse_examples(contract, read_records(os.path.dirname(first_shard),
                                                                 os.path.basename(first_shard)))]
              for key, image in zip(keys.numpy(), inputs.numpy())]
    assert [group[0][0] for group in groups] == [key for key, _ in parsed[:4]]
    for group, (_, image) in zip(groups, parsed):
        assert group[0][1].dtype == np.uint8
        np.testing.assert_array_equal(group[0][1], image)


def test_counts_classes_and_statistics_match_numpy(digits_contract):
    from sklearn.datasets import load_digits

    run_dir, contract = digits_contract
    digits = load_digits()
    images = digits_to_uint8(digits.images)
    keys = [f"digits/{i:04d}" for i in range(len(images))]
    assigned = np.array([splits.stable_split(k, (0.8, 0.1, 0.1), 42) for k in keys])
    train = assigned == "train"

    assert {s: i.count for s, i in contract.splits.items()} == {
        s: int((assigned == s).sum()) for s in ("train", "validation", "test")}
    assert contract.class_names == tuple(str(d) for d in range(10))
    assert contract.input_shape == (8, 8, 1)
    train_pixels = images[train].astype(np.float64)
    np.testing.assert_allclose(contract.statistics["mean"], [train_pixels.mean()], rtol=1e-9)
    np.testing.assert_allclose(contract.statistics["std"], [train_pixels.std()], rtol=1e-9)
    expected_counts = collections.Counter(str(t) for t in digits.target[train])
    assert contract.statistics["class_counts"] == {str(d): expected_counts[str(d)] for d in range(10)}
    assert contract.bad_examples == 0
    assert contract_lib.read_contract(run_dir) == contract


def test_shards_hold_every_example_once_with_the_right_label(digits_contract):
    from sklearn.datasets import load_digits

    run_dir, contract = digits_contract
    data_dir = contract_lib.data_dir(run_dir)
    assert os.listdir(os.path.join(data_dir, "dead_letter")) == []  # no bad input: no dead-letter file
    assert sorted(os.listdir(data_dir)) == [
        "dead_letter", "labels.txt", "metadata.json", "samples.png",
        "test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord",
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
        "validation-00000-of-00002.tfrecord", "validation-00001-of-00002.tfrecord"]
    digits = load_digits()
    seen = {}
    for split in ("train", "validation", "test"):
        for inputs, labels, keys in example_lib.read_split(contract, data_dir, split, 100):
            for image, label, key in zip(inputs.numpy(), labels.numpy(), keys.numpy()):
                seen[key.decode()] = (split, image, label)
    assert len(seen) == 1797
    index = 1234
    split, image, label = seen[f"digits/{index:04d}"]
    assert split == splits.stable_split(f"digits/{index:04d}", (0.8, 0.1, 0.1), 42)
    np.testing.assert_array_equal(image, digits_to_uint8(digits.images[index:index + 1])[0])
    assert label == digits.target[index]


def test_rerun_with_other_runner_settings_gives_identical_examples(digits_contract, tmp_path):
    run_dir, _ = digits_contract
    config = load_config([], ["data.num_shards=2"])
    other = str(tmp_path / "other")
    run_preprocess(config, other, ["--runner=FnApiRunner", "--direct_running_mode=multi_processing",
                                   "--direct_num_workers=2"])
    for split in ("train", "validation", "test"):
        for shard in range(2):
            name = shards.shard_name(split, shard, 2, "none")
            with open(os.path.join(run_dir, "data", name), "rb") as a, open(os.path.join(other, "data", name), "rb") as b:
                assert a.read() == b.read(), name


def test_the_records_parts_are_gone_after_a_run_and_a_killed_runs_parts_too(tmp_path):
    dead = tmp_path / "data" / ".parts-0badc0de"
    dead.mkdir(parents=True)
    (dead / "train-00000-1234.part").write_bytes(b"left by a killed run")
    parts_read = []
    original = shards.read_part

    def read_part(path):  # the shard writer really reads parts (records do not go through the group)
        parts_read.append(path)
        return original(path)

    shards.read_part = read_part
    try:
        contract = run_preprocess(load_config([], ["data.limit=100", "data.num_shards=2"]), str(tmp_path),
                                  IN_PROCESS_BEAM)
    finally:
        shards.read_part = original
    assert parts_read and all("/.parts-" in path for path in parts_read)
    assert not list((tmp_path / "data").glob(".parts-*"))
    assert sum(info.count for info in contract.splits.values()) == 100


def test_only_the_dask_runner_groups_the_records_themselves():
    assert drops_finish_bundle_outputs("apache_beam.runners.dask.dask_runner.DaskRunner")
    assert not drops_finish_bundle_outputs("FnApiRunner") and not drops_finish_bundle_outputs("DataflowRunner")


def test_gzip_shards_and_automatic_shard_count(tmp_path):
    config = load_config([], ["data.compression=gzip", "data.limit=300"])
    contract = run_preprocess(config, str(tmp_path), IN_PROCESS_BEAM)
    assert contract.splits["train"].file_pattern == "train-*-of-00001.tfrecord.gz"
    data_dir = str(tmp_path / "data")
    total = sum(len(read_records(data_dir, f"{s}-*.tfrecord.gz", "GZIP")) for s in ("train", "validation", "test"))
    assert total == 300 == sum(i.count for i in contract.splits.values())


def test_a_crashed_or_refused_run_leaves_the_earlier_data_whole(tmp_path, monkeypatch):
    """The job writes into a staging folder: a crash, or a source refused once read (one class),
    used to have removed the earlier contract and shards already, and the run could not train."""
    config = load_config([], ["data.limit=50"])
    run_preprocess(config, str(tmp_path), IN_PROCESS_BEAM)
    data = tmp_path / "data"

    def state():
        return {path.name: path.read_bytes() for path in data.iterdir() if path.is_file()}

    before = state()
    assert "metadata.json" in before and len([name for name in before if name.endswith(".tfrecord")]) == 3

    def crash(items, path):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr("pipeline.preprocess.write_summary", crash)  # where build_pipeline looks it up
        with pytest.raises(Exception, match="disk full"):
            run_preprocess(config, str(tmp_path), IN_PROCESS_BEAM)
    assert state() == before
    rows = tmp_path / "one_class.csv"
    rows.write_text("text,label\n" + "".join(f"good {index},pos\n" for index in range(10)))
    with pytest.raises(SourceError, match="holds one class"):
        run_preprocess(load_config([], [f"data.source=csv:{rows}"]), str(tmp_path), IN_PROCESS_BEAM)
    assert state() == before
    run_preprocess(config, str(tmp_path), IN_PROCESS_BEAM)  # the next run clears what the crashed one left
    assert state() == before and sorted(path.name for path in data.iterdir() if path.is_dir()) == ["dead_letter"]


def test_a_rerun_removes_the_earlier_shards_first(tmp_path):
    run_preprocess(load_config([], ["data.num_shards=3", "data.limit=60"]), str(tmp_path), IN_PROCESS_BEAM)
    run_preprocess(load_config([], ["data.num_shards=1", "data.limit=60"]), str(tmp_path), IN_PROCESS_BEAM)
    assert sorted(p.name for p in (tmp_path / "data").glob("*.tfrecord")) == [
        "test-00000-of-00001.tfrecord", "train-00000-of-00001.tfrecord", "validation-00000-of-00001.tfrecord"]


def test_unknown_source_fails_before_the_pipeline():
    with pytest.raises(SourceError, match="data.source: 'mnist' is not a known source; allowed: digits"):
        plan_source("mnist")


def test_local_runner_defaults_fill_in_only_what_is_missing():
    assert local_runner_defaults([])[:2] == ["--runner=FnApiRunner", "--direct_running_mode=multi_processing"]
    assert local_runner_defaults(["--runner", "DataflowRunner", "--project", "p"]) == [
        "--runner", "DataflowRunner", "--project", "p"]
    assert local_runner_defaults(["--direct_num_workers=3"]) == [
        "--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=3"]
