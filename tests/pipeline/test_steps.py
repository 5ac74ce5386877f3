import collections

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from kcp.core.beamio import DEAD_LETTER
from kcp.core.config_load import load_config
from kcp.core.sources import SourceRecord, plan_source, read_task
from pipeline import splits
from pipeline.analysis import ChannelStatsFn
from pipeline.preprocess import SourceFactsFn, split_assigner
from pipeline.records import ANALYZE, AUGMENTED, process_record
from pipeline.shards import MAX_SHARDS, shard_count, shard_name, shard_pattern


def test_stable_split_is_deterministic_and_follows_the_fractions():
    keys = [f"example/{i}" for i in range(20_000)]
    first = [splits.stable_split(k, (0.8, 0.1, 0.1), 42) for k in keys]
    assert first == [splits.stable_split(k, (0.8, 0.1, 0.1), 42) for k in keys]
    counts = collections.Counter(first)
    assert abs(counts["train"] / len(keys) - 0.8) < 0.01
    assert abs(counts["validation"] / len(keys) - 0.1) < 0.01
    assert abs(counts["test"] / len(keys) - 0.1) < 0.01


def test_stable_split_depends_on_the_seed():
    keys = [f"k{i}" for i in range(1000)]
    one = [splits.stable_split(k, (0.5, 0.25, 0.25), 1) for k in keys]
    two = [splits.stable_split(k, (0.5, 0.25, 0.25), 2) for k in keys]
    assert one != two


def test_stable_split_with_empty_splits():
    keys = [f"k{i}" for i in range(500)]
    assert {splits.stable_split(k, (1.0, 0.0, 0.0), 0) for k in keys} == {"train"}


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 6, 5, 3), dtype=np.uint8)
    fn = ChannelStatsFn()
    # two partial accumulators merged, as a runner would
    left, right = fn.create_accumulator(), fn.create_accumulator()
    for image in images[:20]:
        left = fn.add_input(left, image)
    for image in images[20:]:
        right = fn.add_input(right, image)
    stats = fn.extract_output(fn.merge_accumulators([left, right, fn.create_accumulator()]))
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], flat.std(axis=0), rtol=1e-9)


def test_channel_stats_keep_the_spread_of_a_feature_with_a_large_offset():
    """A timestamp-like feature (1.7e9 + N(0, 100)) and a constant one: E[x^2] - mean^2 gave std 117.6
    and 128 here; the pairwise merge gives NumPy's to 1e-9 and exactly 0."""
    rng = np.random.default_rng(1)
    series = np.stack([1.7e9 + 100 * rng.normal(size=(40, 30)), np.full((40, 30), 1.7e9)], axis=-1)
    fn = ChannelStatsFn()
    parts = [fn.create_accumulator() for _ in range(3)]
    for index, row in enumerate(series):
        parts[index % 3] = fn.add_input(parts[index % 3], row)
    stats = fn.extract_output(fn.merge_accumulators(parts))
    flat = series.reshape(-1, 2)
    np.testing.assert_allclose(stats["std"][0], flat[:, 0].std(), rtol=1e-9)
    assert stats["std"][1] == 0.0 and stats["mean"][1] == 1.7e9


def test_channel_stats_inside_a_beam_pipeline():
    images = [np.full((2, 2, 1), value, np.uint8) for value in (0, 10, 20)]
    with BeamTestPipeline(argv=['--runner=FnApiRunner']) as pipeline:
        stats = pipeline | beam.Create(images) | beam.CombineGlobally(ChannelStatsFn())
        assert_that(stats, equal_to([{"mean": [10.0], "std": [pytest.approx(np.std([0, 10, 20]))]}]))


@pytest.mark.parametrize("count, size, expected", [(0, 100, 1), (1797, 128, 1), (50_000, 3136, 3),
                                                   (10**9, 10**6, MAX_SHARDS)])
def test_shard_count(count, size, expected):
    assert shard_count(count, size) == expected


def test_shard_names_and_pattern():
    assert shard_name("train", 3, 12, "none") == "train-00003-of-00012.tfrecord"
    assert shard_name("test", 0, 1, "gzip") == "test-00000-of-00001.tfrecord.gz"
    assert shard_pattern("validation", 4, "none") == "validation-*-of-00004.tfrecord"



def test_process_record_decodes_splits_augments_and_encodes_in_one_step():
    import tensorflow as tf

    data = load_config([], ["data.augment.copies=2"]).data
    plan = plan_source("digits", data)
    records = [record for task in plan.tasks for record in read_task(plan, task)]
    assign = split_assigner(False, tuple(data.split), data.seed)
    labels = {name: index for index, name in enumerate(plan.class_names)}
    train = next(r for r in records if assign(r) == "train")
    test = next(r for r in records if assign(r) == "test")

    out = list(process_record(train, plan, assign, labels, data.augment))
    assert [tag for tag, _ in out] == [ANALYZE, AUGMENTED, "train", "train", "train"]
    assert out[0][1].key == train.key and out[1][1] == 2
    examples = [tf.train.Example.FromString(value[1]) for _, value in out[2:]]
    assert [value[0] for _, value in out[2:]] == [train.key, f"{train.key}#aug1", f"{train.key}#aug2"]
    assert {e.features.feature["label"].int64_list.value[0] for e in examples} == {labels[train.label]}

    out = list(process_record(test, plan, assign, labels, data.augment))
    assert [tag for tag, _ in out] == ["test"]  # no statistics and no copies outside train

    broken = SourceRecord("broken", np.zeros((3, 3), np.uint8), train.label)  # not the plan's 8x8
    tags = [tag for tag, _ in process_record(broken, plan, assign, labels, data.augment)]
    assert tags == [DEAD_LETTER]

    facts_fn = SourceFactsFn(plan, data, 100)
    accumulators = [facts_fn.create_accumulator(), facts_fn.create_accumulator()]
    for index, record in enumerate(records):  # two partial accumulators, merged: as on two workers
        accumulators[index % 2] = facts_fn.add_input(accumulators[index % 2], record)
    facts = facts_fn.extract_output(facts_fn.merge_accumulators(accumulators))
    by_split = collections.Counter(assign(r) for r in records)
    assert facts["planned"] == {"train": 3 * by_split["train"], "validation": by_split["validation"],
                                "test": by_split["test"]}
    assert facts["class_names"] == list(plan.class_names) and facts["carve"] is False
    assert facts["num_shards"] == {"train": 1, "validation": 1, "test": 1}
