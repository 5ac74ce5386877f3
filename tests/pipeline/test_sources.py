"""Each source kind end to end: shards and a contract whose counts, classes and statistics match NumPy."""

import collections
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from kcp import cli
from kcp.core import char_ngrams as ngram_lib
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core.config_load import load_config
from kcp.core.contract import tokenize_text
from kcp.core.sources import SourceError, plan_source
from pipeline import splits
from pipeline.preprocess import run_preprocess
from tests.conftest import IN_PROCESS_BEAM


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def read_all(run_dir, contract):
    out = {}
    for split in ("train", "validation", "test"):
        for inputs, labels, keys in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split, 500):
            for value, label, key in zip(inputs.numpy(), labels.numpy(), keys.numpy()):
                out[key.decode()] = (split, value, int(label))
    return out


def test_image_folder_with_corrupt_files(tmp_path, capsys):
    """3,000 good images and 6 bad ones: 6 dead letters with reasons, 3,000 examples, exit 0."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    arrays = {}
    for index in range(3000):
        label = ("cat", "dog", "owl")[index % 3]
        array = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        relative = f"{label}/img{index:04d}.png"
        write_png(str(root / relative), array)
        arrays[relative] = (label, array)
    png = io.BytesIO()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(png, format="PNG")
    (root / "cat" / "truncated.png").write_bytes(png.getvalue()[:40])
    (root / "dog" / "notes.png").write_text("this is not an image")
    (root / "owl" / "empty.png").write_bytes(b"")
    (root / "owl" / "noise.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "cat" / "garbage.gif").write_bytes(b"GIF89a" + b"\x00" * 7)
    os.symlink(tmp_path / "moved.png", root / "dog" / "link.png")  # a broken link
    run_dir = str(tmp_path / "run")

    code = cli.main(["preprocess", "--source", f"folder:{root}", "--run-dir", run_dir, "--", *IN_PROCESS_BEAM])
    assert code == 0
    contract = contract_lib.read_contract(run_dir)
    assert contract.bad_examples == 6
    assert sum(info.count for info in contract.splits.values()) == 3000
    dead = [json.loads(line) for path in (tmp_path / "run" / "data" / "dead_letter").iterdir()
            for line in path.read_text().splitlines()]
    assert sorted(d["key"] for d in dead) == ["cat/garbage.gif", "cat/truncated.png", "dog/link.png",
                                              "dog/notes.png", "owl/empty.png", "owl/noise.jpg"]
    reasons = {d["key"]: d["reason"] for d in dead}
    assert reasons["owl/empty.png"] == "empty file"
    assert reasons["dog/link.png"] == f"a broken symbolic link (to {tmp_path / 'moved.png'}, which does not exist)"
    assert reasons["dog/notes.png"].startswith("not a decodable image")
    assert "6 bad inputs" in capsys.readouterr().out

    assert contract.class_names == ("cat", "dog", "owl") and contract.input_shape == (6, 5, 3)
    train = [arrays[k][1] for k in arrays if splits.stable_split(k, (0.8, 0.1, 0.1), 42) == "train"]
    pixels = np.stack(train).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(contract.statistics["mean"], pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(contract.statistics["std"], pixels.std(axis=0), rtol=1e-9)
    counts = collections.Counter(arrays[k][0] for k in arrays if splits.stable_split(k, (0.8, 0.1, 0.1), 42) == "train")
    assert contract.statistics["class_counts"] == dict(counts)
    written = read_all(run_dir, contract)
    split, value, label = written["dog/img0001.png"]
    np.testing.assert_array_equal(value, arrays["dog/img0001.png"][1])
    assert contract.class_names[label] == "dog"


def test_too_many_bad_inputs_fail_without_a_contract(tmp_path, capsys):
    root = tmp_path / "images"
    for index in range(20):
        write_png(str(root / "a" / f"{index}.png"), np.zeros((4, 4), np.uint8))
    for index in range(2):
        (root / "a" / f"bad{index}.png").write_bytes(b"")
    write_png(str(root / "b" / "x.png"), np.zeros((4, 4), np.uint8))
    code = cli.main(["preprocess", "--source", f"folder:{root}", "--run-dir", str(tmp_path / "run"),
                     "--", *IN_PROCESS_BEAM])
    assert code == 2
    assert "data.max_bad_fraction: 2 of 23 inputs (8.7%) could not be read" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data" / "metadata.json").exists()
    assert len(list((tmp_path / "run" / "data" / "dead_letter").iterdir())) == 1


def test_folder_splits_are_kept_sizes_and_channels_inferred(tmp_path):
    root = tmp_path / "images"
    for index in range(30):
        write_png(str(root / "train" / ("a" if index % 2 else "b") / f"{index}.png"), np.full((10, 8), index, np.uint8))
    for index in range(6):
        write_png(str(root / "test" / ("a" if index % 2 else "b") / f"{index}.png"), np.full((10, 8), 7, np.uint8))
    write_png(str(root / "train" / "a" / "odd.png"), np.full((20, 16, 3), 100, np.uint8))  # colour, other size
    run_dir = str(tmp_path / "run")
    contract = run_preprocess(load_config([], [f"data.source=folder:{root}"]), run_dir, IN_PROCESS_BEAM)
    assert contract.input_shape == (10, 8, 3)  # the most common size; colour because one image has it
    assert contract.splits["test"].count == 6
    assert contract.splits["train"].count + contract.splits["validation"].count == 31
    assert contract.splits["validation"].count > 0  # carved out of train, the source has none
    written = read_all(run_dir, contract)
    assert all(split == "test" for key, (split, _, _) in written.items() if key.startswith("test/"))
    resized = written["train/a/odd.png"][1]
    assert resized.shape == (10, 8, 3) and np.all(resized == 100)


def test_classes_with_no_train_example_are_named_in_a_warning(tmp_path):
    """A test/ folder with `Cat` (train has `cat`) and `bird`: kept as classes (their test examples are
    real), and the closing lines say that the model cannot learn them, and why it may be."""
    root = tmp_path / "images"
    for index in range(20):
        write_png(str(root / "train" / ("cat" if index % 2 else "dog") / f"{index}.png"), np.full((6, 6), index, np.uint8))
    for name in ("Cat", "dog", "bird"):
        write_png(str(root / "test" / name / "0.png"), np.full((6, 6), 3, np.uint8))
    lines = []
    contract = run_preprocess(load_config([], [f"data.source=folder:{root}"]), str(tmp_path / "run"), IN_PROCESS_BEAM,
                              report=lines.append)
    assert contract.class_names == ("Cat", "bird", "cat", "dog")
    assert contract.statistics["class_counts"]["Cat"] == contract.statistics["class_counts"]["bird"] == 0
    assert ("warning: 2 of 4 classes have no train example: 'Cat', 'bird' (Cat and cat differ only in case); "
            "the model cannot learn them and predicts another class for their examples; add train examples, "
            "or merge or drop those labels") in lines


def test_class_folders_that_differ_only_in_unicode_normalization_are_named_in_a_warning(tmp_path):
    """`café` in NFC beside `café` in NFD (copied from macOS): two classes that print alike."""
    root = tmp_path / "images"
    for index in range(24):
        name = ("caf\u00e9", "cafe\u0301", "tea")[index % 3]
        write_png(str(root / name / f"{index}.png"), np.full((6, 6), index, np.uint8))
    lines = []
    contract = run_preprocess(load_config([], [f"data.source=folder:{root}"]), str(tmp_path / "run"), IN_PROCESS_BEAM,
                              report=lines.append)
    assert len(contract.class_names) == 3
    assert ("warning: classes 'cafe\\u0301' and 'caf\\xe9' differ only in Unicode normalization (NFC, NFD), so they "
            "are separate classes; rename them to one spelling if they are one class") in lines
    assert not [line for line in lines if "Unicode" in line and "tea" in line]


def test_the_case_hint_names_only_classes_without_train_examples():
    from types import SimpleNamespace

    from pipeline.summary import untrained_classes_warning

    def contract(counts):
        return SimpleNamespace(class_names=tuple(counts), statistics={"class_counts": counts},
                               splits={"train": SimpleNamespace(count=sum(counts.values()))})

    assert untrained_classes_warning(contract({"Cat": 3, "bird": 0, "cat": 4})).startswith(
        "warning: 1 of 3 classes have no train example: 'bird'; the model")  # Cat and cat both train
    assert untrained_classes_warning(contract({"Cat": 3, "cat": 4})) is None


def test_classes_that_differ_only_in_case_and_imbalanced_classes_are_named_in_warnings():
    """`Cat/` beside `cat/`, or labels `pos` and `Pos`, were two classes without a word; so was a train
    split of 95% one class, where a model that always answers it is blessed at 0.95 accuracy."""
    from types import SimpleNamespace

    from pipeline.summary import imbalanced_classes_warning, lookalike_classes_warning

    def contract(counts):
        return SimpleNamespace(class_names=tuple(counts), statistics={"class_counts": counts})

    assert lookalike_classes_warning(contract({"Pos": 5, "neg": 5, "pos": 5})) == (
        "warning: classes 'Pos' and 'pos' differ only in case, so they are separate classes; rename them to one "
        "spelling if they are one class")
    assert lookalike_classes_warning(contract({"Pos": 5, "neg": 5})) is None
    assert imbalanced_classes_warning(contract({"noise": 297, "signal": 16})) == (
        "warning: the train split's classes are imbalanced: 'noise' has 297 of 313 examples (94.9%), 'signal' 16 "
        "(5.1%); a model that always answers 'noise' scores about 0.9489 accuracy: judge accuracy against that, "
        "and the report's per-class recall")
    assert imbalanced_classes_warning(contract({"a": 100, "b": 50, "c": 9})).startswith(  # 11 to 1
        "warning: the train split's classes are imbalanced: 'a' has 100 of 159 examples (62.9%), 'c' 9 (5.7%)")
    assert imbalanced_classes_warning(contract({"a": 60, "b": 30, "c": 10})) is None  # 6 to 1, 60%
    assert imbalanced_classes_warning(contract({str(digit): 180 for digit in range(10)})) is None
    assert imbalanced_classes_warning(contract({"a": 40, "b": 0})) is None  # no train example: the other warning's


def test_labels_with_fewer_than_two_train_examples_a_class_are_named_in_a_warning(tmp_path, capsys):
    """A regression target (float y) became one class per value, and an id column one class per row,
    without a word; a line now says so, in place of the untrained-classes line it would also raise."""
    from types import SimpleNamespace

    from pipeline.summary import sparse_classes_warning

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "target.npz", x=rng.normal(size=(120, 16)).astype(np.float32), y=rng.normal(size=120))
    code = cli.main(["preprocess", "--source", f"npz:{tmp_path / 'target.npz'}", "--run-dir", str(tmp_path / "run"),
                     "--set", "data.modality=sequence", "--", *IN_PROCESS_BEAM])
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning:" in line]
    assert code == 0 and len(warnings) == 1, out
    assert "classes for" in warnings[0] and "train examples, fewer than 2 a class on average" in warnings[0]
    assert "are the labels a continuous value (a regression target" in warnings[0]

    def contract(counts):
        return SimpleNamespace(class_names=tuple(sorted(counts)), statistics={"class_counts": counts})

    ids = contract({f"user-{i}": 1 for i in range(30)})
    assert sparse_classes_warning(ids) == (
        "warning: 30 classes for 30 train examples, fewer than 2 a class on average (e.g. 'user-0', 'user-1', "
        "'user-10'): a classifier cannot learn a class from one example; are the labels an id or free text rather "
        "than classes (data.label_column)?")
    assert sparse_classes_warning(contract({str(i): 2 for i in range(30)})) is None  # 2 each: few, but classes
    assert sparse_classes_warning(contract({"a": 1, "b": 1, "c": 0})) is None  # few classes: the other warnings'


def test_an_empty_validation_split_of_a_corpus_is_told_to_split_its_files():
    """A corpus's documents go whole to one split: a larger validation share cannot divide one file."""
    from types import SimpleNamespace

    from pipeline.summary import empty_validation_warning

    splits = {"train": SimpleNamespace(count=40), "validation": SimpleNamespace(count=0),
              "test": SimpleNamespace(count=0)}
    contract = SimpleNamespace(modality="language", splits=splits, statistics={"documents": {"train": 1}})
    assert empty_validation_warning(contract, load_config([], [])).endswith(
        "metrics; each file is one document and goes whole to one split (1 document): split the text into more "
        "files, or add files")


def test_npz_images_without_splits(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(200, 7, 7), dtype=np.int64)
    y = rng.integers(0, 4, size=200)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    run_dir = str(tmp_path / "run")
    contract = run_preprocess(load_config([], [f"data.source=npz:{path}"]), run_dir, IN_PROCESS_BEAM)
    assert contract.modality == "image" and contract.input_shape == (7, 7, 1)
    assert contract.class_names == ("0", "1", "2", "3")
    train = np.array([splits.stable_split(f"all/{i:07d}", (0.8, 0.1, 0.1), 42) == "train" for i in range(200)])
    np.testing.assert_allclose(contract.statistics["mean"], [x[train].mean()], rtol=1e-9)
    assert contract.statistics["class_counts"] == {str(c): int((y[train] == c).sum()) for c in range(4)}


def test_npz_sequences_keep_their_splits(tmp_path):
    rng = np.random.default_rng(2)
    x_train = rng.normal(size=(50, 12, 2)).astype(np.float32) * [1.0, 5.0] + [0.0, 3.0]
    x_test = rng.normal(size=(10, 12, 2)).astype(np.float32)
    x_validation = rng.normal(size=(5, 12, 2)).astype(np.float32)
    path = tmp_path / "seq.npz"
    np.savez(path, x_train=x_train, y_train=np.array(["up", "down"] * 25), x_test=x_test,
             y_test=np.array(["up", "down"] * 5), x_validation=x_validation, y_validation=np.array(["up"] * 5))
    run_dir = str(tmp_path / "run")
    contract = run_preprocess(load_config([], [f"data.source=npz:{path}"]), run_dir, IN_PROCESS_BEAM)
    assert contract.modality == "sequence" and contract.input_shape == (12, 2)
    assert {s: i.count for s, i in contract.splits.items()} == {"train": 50, "validation": 5, "test": 10}
    assert contract.class_names == ("down", "up")
    flat = x_train.reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(contract.statistics["mean"], flat.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(contract.statistics["std"], flat.std(axis=0), rtol=1e-5)
    written = read_all(run_dir, contract)
    np.testing.assert_allclose(written["test/0000003"][1], x_test[3])


TEXTS = ["A good movie, truly good!", "Bad plot; bad acting.", "good fun", "so bad", "Good, good, GOOD",
         "terrible and bad", "", "fine film, good cast"] * 5


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_text_tables(tmp_path, kind):
    labels = ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "pos"] * 5
    split_values = (["train"] * 6 + ["test", "validation"]) * 5
    path = tmp_path / f"reviews.{kind}"
    if kind == "csv":
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["review", "sentiment", "split"])
            writer.writerows(zip(TEXTS, labels, split_values))
    else:
        path.write_text("".join(json.dumps({"review": t, "sentiment": l, "split": s}) + "\n"
                                for t, l, s in zip(TEXTS, labels, split_values)))
    run_dir = str(tmp_path / "run")
    config = load_config([], [f"data.source={kind}:{path}", "data.text_column=review", "data.label_column=sentiment",
                              "data.min_count=2", "data.max_bad_fraction=0.2"])
    contract = run_preprocess(config, run_dir, IN_PROCESS_BEAM)
    assert contract.modality == "text" and contract.class_names == ("neg", "pos")
    assert contract.bad_examples == 5  # the empty texts, all in the test split
    assert {s: i.count for s, i in contract.splits.items()} == {"train": 30, "validation": 5, "test": 0}
    assert contract.statistics["tokenizer"] == "words_and_punctuation"  # the default: marks are tokens
    tokens = collections.Counter(t for text, s in zip(TEXTS, split_values) if s == "train"
                                 for t in tokenize_text(text, "words_and_punctuation"))
    expected = sorted([t for t, c in tokens.items() if c >= 2], key=lambda t: (-tokens[t], t))
    assert contract_lib.read_vocabulary(run_dir) == expected
    assert contract.statistics["vocab_size"] == len(expected) + 2
    lengths = sorted(len(tokenize_text(t, "words_and_punctuation"))
                     for t, s in zip(TEXTS, split_values) if s == "train")
    assert contract.statistics["max_length"] == lengths[int(np.ceil(0.95 * len(lengths))) - 1]
    characters = sorted(len(ngram_lib.char_ngram_text(t)) for t, s in zip(TEXTS, split_values) if s == "train")
    assert contract.statistics["max_characters"] == characters[int(np.ceil(0.95 * len(characters))) - 1]
    assert (contract.statistics["char_ngrams"], contract.statistics["char_ngram_buckets"]) == (4, 2**16)


def test_text_trains_and_exports_raw_strings(tmp_path):
    path = tmp_path / "t.jsonl"  # each line ends in text matplotlib's math parser refuses: drawn as written;
    # a token ending in NUL ("empty\x00"; NumPy would make it a second "empty") is out of vocabulary
    path.write_text("".join(json.dumps({"text": (t or "empty\x00 empty") + r" so $p \implies q$", "label": l}) + "\n"
                            for t, l in zip(TEXTS, ["pos", "neg", "pos", "neg", "pos", "neg", "neg", "pos"] * 5)))
    run_dir = str(tmp_path / "run")
    code = cli.main(["run", "--source", f"jsonl:{path}", "--run-dir", run_dir, "--model", "transformer",
                     "--set", "train.epochs=2", "--set", "data.min_count=1", "--", *IN_PROCESS_BEAM])
    assert code == 0
    import tensorflow as tf

    serve = tf.saved_model.load(os.path.join(run_dir, "export", "model", "1")).signatures["serving_default"]
    outputs = serve(text=tf.constant(["good good movie", "bad bad plot"]))
    assert outputs["probabilities"].shape == (2, 2)

    # batch prediction of a table without labels (what there is to predict has none), each line as served
    unlabeled = tmp_path / "new.csv"
    unlabeled.write_text('text\ngood good movie\n"bad, bad plot"\n"  "\n')  # the last: a dead letter
    output = str(tmp_path / "predictions.jsonl")
    assert cli.main(["predict", "--run-dir", run_dir, "--input", f"csv:{unlabeled}", "--output", output,
                     "--single-file", "--", *IN_PROCESS_BEAM]) == 0
    lines = sorted((json.loads(line) for line in open(output)), key=lambda line: line["key"])
    served = serve(text=tf.constant(["good good movie", "bad, bad plot"]))["probabilities"].numpy()
    assert [line["key"] for line in lines] == ["row/00000001", "row/00000002"]
    assert [line["class_name"] for line in lines] == [("neg", "pos")[int(np.argmax(row))] for row in served]
    assert [line["probability"] for line in lines] == pytest.approx(served.max(axis=1), abs=1e-5)
    [dead] = [json.loads(line) for line in open(tmp_path / "predictions.dead_letter.jsonl")]
    assert (dead["key"], dead["reason"]) == ("row/00000003", "row 3 (line 4): column 'text': empty text")


@pytest.mark.parametrize("uri, message", [
    ("folder:/nonexistent/x", "data.source: /nonexistent/x does not exist"),
    ("npz:/nonexistent.npz", "data.source: /nonexistent.npz does not exist"),
    ("csv:", "names no path"),
    ("parquet:x", "is not a known source"),
])
def test_bad_sources_fail_before_the_pipeline(uri, message):
    with pytest.raises(SourceError, match=message):
        plan_source(uri)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "npz"])
def test_a_folder_named_where_a_file_is_read_is_one_line(tmp_path, kind):
    with pytest.raises(SourceError, match=f"data.source: {tmp_path} is a folder; {kind}: reads one file"):
        plan_source(f"{kind}:{tmp_path}")


def test_a_file_named_as_an_image_folder_is_one_line(tmp_path):
    image = tmp_path / "one.png"
    Image.new("RGB", (4, 4)).save(image)
    with pytest.raises(SourceError, match=f"data.source: {image} is a file; folder: reads a folder of class folders"):
        plan_source(f"folder:{image}")
    with pytest.raises(SourceError) as raised:  # batch prediction reads a folder of images too: said so
        plan_source(f"folder:{image}", labels=False)
    assert str(raised.value) == (f"data.source: {image} is a file; folder: reads a folder of images (or of folders "
                                 "of them) (name the folder that holds them)")


def test_a_npy_file_named_as_npz_says_how_to_save_one(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 3)))
    with pytest.raises(SourceError) as raised:
        plan_source(f"npz:{path}")
    assert str(raised.value) == (f"data.source: {path} is not a NumPy .npz archive (File is not a zip file); a .npy "
                                 "holds one array: save the inputs and labels together, np.savez(PATH, x=x, y=y)")


def test_missing_text_column_is_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("body,label\nhello,a\n")
    with pytest.raises(SourceError, match="data.text_column: column 'text' is not in .*t.csv \\(it has body, label\\)"):
        plan_source(f"csv:{path}")


def test_npz_without_known_arrays_is_named(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 3, 3)))
    with pytest.raises(SourceError, match="expected arrays x and y, or x_train and y_train"):
        plan_source(f"npz:{path}")


def test_tfds_not_prepared_names_the_directory_and_the_command(tmp_path):
    with pytest.raises(SourceError, match=f"tfds 'mnist' is not prepared in {tmp_path}; prepare it with `tfds build mnist"):
        plan_source("tfds:mnist", load_config([], [f"data.tfds_data_dir={tmp_path}"]).data)


def test_augmented_run_is_identical_across_runner_settings(tmp_path):
    config = load_config([], ["data.augment.copies=2", "data.limit=300", "data.num_shards=2"])
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    contract = run_preprocess(config, one, IN_PROCESS_BEAM)
    run_preprocess(config, two, ["--runner=FnApiRunner", "--direct_running_mode=multi_processing",
                                 "--direct_num_workers=2"])
    assert contract.splits["train"].count == 3 * sum(1 for i in range(300) if splits.stable_split(
        f"digits/{i:04d}", (0.8, 0.1, 0.1), 42) == "train")
    for name in sorted(os.listdir(os.path.join(one, "data"))):
        if name.endswith(".tfrecord"):
            with open(os.path.join(one, "data", name), "rb") as a, open(os.path.join(two, "data", name), "rb") as b:
                assert a.read() == b.read(), name
    assert os.path.getsize(os.path.join(one, "data", "samples.png")) > 5000


def test_tfds_source_with_mock_data(tmp_path):
    """tfds.testing.mock_data serves random examples offline; `is_prepared` is all it cannot fake."""
    from unittest import mock

    import tensorflow_datasets as tfds

    run_dir = str(tmp_path / "run")
    config = load_config([], ["data.source=tfds:mnist:train", f"data.tfds_data_dir={tmp_path}"])
    with tfds.testing.mock_data(num_examples=40), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        contract = run_preprocess(config, run_dir, IN_PROCESS_BEAM)
    assert contract.modality == "image" and contract.input_shape == (28, 28, 1)
    assert contract.class_names == tuple(str(d) for d in range(10))
    assert sum(i.count for i in contract.splits.values()) == 40
    assert contract.splits["train"].count > contract.splits["test"].count > 0


def test_a_tfds_image_of_other_than_1_or_3_channels_is_refused_at_planning(tmp_path):
    """EuroSAT's 13 Sentinel-2 bands: the export's image_bytes decoder gives gray or RGB only."""
    from unittest import mock

    import tensorflow_datasets as tfds

    config = load_config([], ["data.source=tfds:eurosat/all:train", f"data.tfds_data_dir={tmp_path}"])
    with tfds.testing.mock_data(num_examples=10), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        with pytest.raises(SourceError) as raised:
            plan_source("tfds:eurosat/all:train", config.data)
    assert str(raised.value) == ("data.source: tfds 'eurosat/all' input 'sentinel2' has 13 channels; images have 1 "
                                 "(grayscale) or 3 (RGB)")


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_grayscale_png_decodes_as_tensorflow_decodes_it(tmp_path, channels):
    """Preprocessing (Pillow) and the export's in-graph decode (TensorFlow) must give the same
    pixels: TensorFlow keeps the high byte of a 16-bit value, Pillow's convert("L") clips."""
    import tensorflow as tf

    from kcp.core.sources.images import decode_image_file, to_8_bit

    values = np.array([[0, 255, 256, 1000], [32767, 32768, 65280, 65535]], np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)  # a real 16-bit grayscale PNG
    with Image.open(path) as image:
        assert image.mode == "I;16"
    decoded = decode_image_file(path, (2, 4, channels))
    expected = tf.io.decode_png(open(path, "rb").read(), channels=channels, dtype=tf.uint8).numpy()
    assert decoded.dtype == np.uint8 and decoded.tolist() == expected.tolist()
    assert decoded[..., 0].tolist() == [[0, 0, 1, 3], [127, 128, 255, 255]]  # clipping gave [[0, 255, 255, 255], ...]
    # older Pillow opened such files as 32-bit "I": the same high bytes
    assert np.asarray(to_8_bit(Image.fromarray(values.astype(np.int32), "I"))).tolist() == expected[..., 0].tolist()


def test_images_of_several_sizes_are_named_at_planning_with_the_size_they_are_stretched_to(tmp_path):
    """Photos of 10 sizes: the most common, 35 of 184, was chosen and every other image stretched
    to it, without a word (the docs did not say that resizing stretches either)."""
    from kcp.core.sources import folder_warning_lines

    rng = np.random.default_rng(0)
    sizes = {"a": [(6, 8)] * 4 + [(8, 6)] * 3, "b": [(6, 8)] * 2 + [(5, 5)] * 3}  # 6x8: 6 of 12, not most
    for label, shapes in sizes.items():
        for index, shape in enumerate(shapes):
            write_png(str(tmp_path / "mixed" / label / f"{index}.png"), rng.integers(0, 255, shape, np.uint8))
    plan = plan_source(f"folder:{tmp_path / 'mixed'}")
    assert plan.input_spec.shape == (6, 8, 1)
    assert folder_warning_lines(plan) == [
        "the 12 sampled images have 3 sizes: all are resized to 6x8, the most common (6 of them), the aspect ratio "
        "not kept; choose the size with data.image_size=[HEIGHT, WIDTH]"]
    write_png(str(tmp_path / "mixed" / "b" / "extra.png"), rng.integers(0, 255, (5, 5), np.uint8))
    write_png(str(tmp_path / "mixed" / "a" / "extra.png"), rng.integers(0, 255, (8, 6), np.uint8))
    assert folder_warning_lines(plan_source(f"folder:{tmp_path / 'mixed'}"))[0].startswith(
        "warning: the 14 sampled images have 3 sizes: all are resized to 6x8, the most common (6 of them)")
    chosen = load_config([], ["data.image_size=[6, 8]"]).data
    assert folder_warning_lines(plan_source(f"folder:{tmp_path / 'mixed'}", chosen)) == []


def test_large_photos_default_to_256_on_their_longer_side(tmp_path):
    """A folder of 4032x3024 phone photos planned at full size: one batch of 64 is 9 GB of floats
    before the first convolution. The most common size is scaled down to 256 a side by default
    (Ludwig's inferred maximum; Keras' image_dataset_from_directory takes 256x256), and said."""
    from kcp.core.sources import folder_warning_lines

    for label in ("a", "b"):
        for index in range(2):
            write_png(str(tmp_path / "big" / label / f"{index}.png"), np.zeros((300, 600), np.uint8))
    plan = plan_source(f"folder:{tmp_path / 'big'}")
    assert plan.input_spec.shape == (128, 256, 1)
    assert folder_warning_lines(plan) == [
        "the most common image size, 300x600, is above 256 a side: images are resized to 128x256; choose the size "
        "with data.image_size=[HEIGHT, WIDTH]"]
    chosen = plan_source(f"folder:{tmp_path / 'big'}", load_config([], ["data.image_size=[300, 600]"]).data)
    assert chosen.input_spec.shape == (300, 600, 1) and folder_warning_lines(chosen) == []


def test_photos_with_an_exif_rotation_are_named_at_planning(tmp_path):
    """A phone's portrait photos are stored sideways with an EXIF orientation, which neither the
    pipeline nor the export's decoder (tf.io.decode_jpeg) applies: they trained turned, silently."""
    from kcp.core.sources import folder_warning_lines

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for index in range(3):
            image = Image.fromarray(rng.integers(0, 255, (6, 8, 3), np.uint8))
            exif = Image.Exif()
            exif[0x0112] = 6 if (label, index) in (("a", 0), ("b", 2)) else 1  # 6: turn 90 degrees to show it
            os.makedirs(tmp_path / "photos" / label, exist_ok=True)
            image.save(tmp_path / "photos" / label / f"{index}.jpg", exif=exif)
    plan = plan_source(f"folder:{tmp_path / 'photos'}")
    assert folder_warning_lines(plan) == [
        "warning: 2 of the 6 sampled images carry an EXIF orientation (a phone's photos): it is not applied, in "
        "training or by the export's decoder, as tf.io.decode_jpeg does not, so they are read as stored, turned; "
        "rotate them first (PIL.ImageOps.exif_transpose)"]


def test_12_bit_data_in_16_bit_pngs_is_named_at_planning_and_a_float_image_is_a_dead_letter(tmp_path, capsys):
    """Values of 0..4095 in 16-bit PNGs (as microscopes save them) keep their high byte, 16 levels,
    as the export decodes them: planning says so. A 32-bit float TIFF (mode F) of 0..1 was read as
    an all-black image, silently; it is a dead letter naming its values."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for index in range(12):
            write_png(str(tmp_path / "deep" / label / f"{index}.png"), rng.integers(0, 4000, (6, 5), np.uint16))
    Image.fromarray(np.full((6, 5), 4001, np.uint16)).save(tmp_path / "deep" / "a" / "top.png")
    Image.fromarray(np.linspace(0.25, 0.75, 30, dtype=np.float32).reshape(6, 5), "F").save(
        tmp_path / "deep" / "b" / "float.tif")
    run_dir = str(tmp_path / "run")
    code = cli.main(["preprocess", "--source", f"folder:{tmp_path / 'deep'}", "--run-dir", run_dir,
                     "--set", "data.max_bad_fraction=0.1", "--", *IN_PROCESS_BEAM])
    assert code == 0
    assert ("warning: the 25 sampled 16-bit gray images hold values up to 4001 only: they are read as 8 bits by "
            "their high byte (v >> 8), as the export's PNG decoder reads them, which leaves 16 levels; scale them "
            "to 0..65535 or to 8 bits first (e.g. x * (65535 // x.max()))") in capsys.readouterr().out
    [dead] = [json.loads(line) for path in (tmp_path / "run" / "data" / "dead_letter").iterdir()
              for line in path.read_text().splitlines()]
    assert dead["key"] == "b/float.tif" and dead["reason"] == (
        "a 32-bit floating-point image (values 0.25..0.75); images are read as 0..255 pixels: save it as 8 bits "
        "(for values of 0..1, x * 255)")
    assert contract_lib.read_contract(run_dir).bad_examples == 1
    full = tmp_path / "full"  # 16-bit data that uses its range: no warning
    for label in ("a", "b"):
        for index in range(3):
            write_png(str(full / label / f"{index}.png"), rng.integers(0, 65535, (6, 5), np.uint16))
    assert cli.main(["preprocess", "--source", f"folder:{full}", "--run-dir", str(tmp_path / "run2"),
                     "--set", "data.limit=6", "--", *IN_PROCESS_BEAM]) == 0
    printed = capsys.readouterr().out
    assert "16-bit" not in printed and "plan: 6 inputs in 1 read task, 2 classes" in printed  # data.limit: one task


def test_digits_are_read_without_importing_scikit_learn():
    """The digits source reads the file scikit-learn ships: the arrays of load_digits(), and
    a `kcp preprocess` process imports neither scikit-learn nor TensorFlow."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from kcp.core.sources.images import load_digits_arrays

    images, targets = load_digits_arrays()
    digits = load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(targets, digits.target)
    probe = ("import sys\nfrom kcp.cli import commands\nfrom kcp.core.sources.images import read_digits\n"
             "assert len(list(read_digits(0, 1797))) == 1797\n"
             "print(sorted(m for m in ('sklearn', 'tensorflow', 'keras', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_text_whose_tokens_are_all_rarer_than_min_count_is_one_line_at_preprocess(tmp_path, capsys):
    """Unique product codes: an empty vocabulary, which preprocess accepted and training then crashed
    on with Keras' traceback ("Cannot set an empty vocabulary")."""
    rows = "".join(f"X{index:05d}Q,{'ab'[index % 2]}\n" for index in range(60))
    (tmp_path / "codes.csv").write_text("code,family\n" + rows)
    run_dir = tmp_path / "run"
    args = ["preprocess", "--source", f"csv:{tmp_path / 'codes.csv'}", "--run-dir", str(run_dir), "--set",
            "data.text_column=code", "--set", "data.label_column=family"]
    assert cli.main([*args, "--", *IN_PROCESS_BEAM]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"kcp preprocess: error: data.min_count: no token occurs 2 times in the train split of csv:{tmp_path / 'codes.csv'}, "
        "so the vocabulary is empty (unique codes or ids, or a small set); set data.min_count=1 to keep every token")
    assert not (run_dir / "data" / "metadata.json").exists()
    assert cli.main([*args, "--set", "data.min_count=1", "--", *IN_PROCESS_BEAM]) == 0
