"""What a user's raw data holds beyond the happy path: layouts, array names, headers, line
endings and labels. Each case lost data silently or crashed before; now it is read, a dead
letter with its reason, or a one-line error naming the file, the key and the value."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from kcp import cli
from kcp.core.config_load import load_config
from kcp.core.contract import FeatureSpec
from kcp.core.sources import (BadInput, SourceError, class_names_of, decode_array, decode_record, plan_source,
                              read_task)
from kcp.core.sources.base import label_text
from pipeline.samples import displayable
from tests.conftest import IN_PROCESS_BEAM


def image(path, value, shape=(4, 5), format=None, **options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path, format=format, **options)


def records_of(uri, *overrides, labels=True):
    plan = plan_source(uri, load_config([], list(overrides)).data, labels=labels)
    return plan, [record for task in plan.tasks for record in read_task(plan, task)]


def problems(plan, records, class_names):
    out = []
    for record in records:
        try:
            out.append(decode_record(plan, record, class_names).label)
        except BadInput as error:
            out.append(f"bad: {error}")
    return out


def write_table(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# --- folders --------------------------------------------------------------------------------

def test_a_stray_image_is_named_and_does_not_flip_the_split_layout(tmp_path):
    root = tmp_path / "stray"
    for split in ("train", "test"):
        for label in "ab":
            for index in range(3):
                image(str(root / split / label / f"{index}.png"), index)
    plan, records = records_of(f"folder:{root}")
    assert plan.has_splits and plan.class_names == ("a", "b") and len(records) == 12
    image(str(root / "train" / "stray.png"), 9)
    with pytest.raises(SourceError, match=rf"^data.source: {root}/train/stray.png is not in a class folder "
                                          rf"\({root}/<split>/<class>/\); move it into one or remove it$"):
        plan_source(f"folder:{root}")
    os.remove(root / "train" / "stray.png")
    image(str(root / "extra" / "c" / "0.png"), 1)  # a folder beside the split folders
    with pytest.raises(SourceError, match=r"holds split folders \(test, train\) and other folders \('extra'\)"):
        plan_source(f"folder:{root}")


def test_folders_read_val_subfolders_webp_and_tiff_and_count_what_they_skip(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val", "test"):
        for label in "ab":
            image(str(root / split / label / "0.png"), 10)
    image(str(root / "train" / "c" / "2020" / "deep" / "1.png"), 20)  # a class's subfolders belong to it
    image(str(root / "train" / "c" / "x.webp"), 30, format="WEBP", lossless=True)
    image(str(root / "train" / "a" / "y.tif"), 40, format="TIFF")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0")  # hidden: not read, not counted
    (root / "README.md").write_text("about")
    image(str(tmp_path / "elsewhere" / "0.png"), 50)
    os.symlink(tmp_path / "elsewhere", root / "train" / "d")  # a class folder that is a link
    plan, records = records_of(f"folder:{root}")
    assert plan.class_names == ("a", "b", "c", "d")
    assert sorted((r.key, r.label, r.split) for r in records) == [
        ("test/a/0.png", "a", "test"), ("test/b/0.png", "b", "test"),
        ("train/a/0.png", "a", "train"), ("train/a/y.tif", "a", "train"), ("train/b/0.png", "b", "train"),
        ("train/c/2020/deep/1.png", "c", "train"), ("train/c/x.webp", "c", "train"), ("train/d/0.png", "d", "train"),
        ("val/a/0.png", "a", "validation"), ("val/b/0.png", "b", "validation")]
    assert plan.options["skipped"] == 2 and plan.options["skipped_examples"] == ("README.md", "train/a/notes.txt")
    values = {r.key: int(decode_record(plan, r).inputs.mean()) for r in records}
    assert values["train/c/x.webp"] == 30 and values["train/a/y.tif"] == 40 and values["train/c/2020/deep/1.png"] == 20
    os.makedirs(root / "valid" / "a")
    with pytest.raises(SourceError, match=f"{root}/val and {root}/valid are both the validation split"):
        plan_source(f"folder:{root}")


def test_an_empty_class_folder_and_a_name_that_is_not_utf8_are_named(tmp_path):
    root = tmp_path / "images"
    image(str(root / "a" / "0.png"), 1)
    (root / "b").mkdir()
    (root / "b" / "list.csv").write_text("x")
    with pytest.raises(SourceError, match=f"^data.source: class folder {root}/b holds no .png/.jpg/.jpeg/.bmp/"
                                          ".gif/.webp/.tif/.tiff files; add images or remove it$"):
        plan_source(f"folder:{root}")
    os.remove(root / "b" / "list.csv")
    os.rmdir(root / "b")
    weird = os.path.join(os.fsencode(root), b"caf\xe9")
    os.makedirs(weird)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(os.path.join(weird, b"0.png"))
    with pytest.raises(SourceError, match=r"class folder b'caf\\xe9' in .* is not a UTF-8 name; rename it"):
        plan_source(f"folder:{root}")


def test_without_labels_a_folder_needs_no_class_folders(tmp_path):
    """Batch prediction reads every image below the folder, keyed by its relative path; training
    keeps refusing a folder whose images are in no class folder."""
    root = tmp_path / "new"
    image(str(root / "a.png"), 1)
    image(str(root / "b.jpg"), 2, format="JPEG")
    image(str(root / "2024" / "may" / "c.png"), 3)
    image(str(root / ".hidden" / "d.png"), 4)  # hidden: not read
    (root / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    plan, records = records_of(f"folder:{root}", labels=False)
    assert sorted((r.key, r.label, r.split) for r in records) == [
        ("2024/may/c.png", "", None), ("a.png", "", None), ("b.jpg", "", None)]
    assert plan.class_names == () and plan.has_splits is False and plan.estimated_count == 3
    assert plan.options["skipped"] == 1 and plan.input_spec.shape == (4, 5, 1)
    assert {r.key: r.payload for r in records}["2024/may/c.png"] == f"{root}/2024/may/c.png"
    plan, records = records_of(f"folder:{root}", "data.limit=2", labels=False)
    assert [r.key for r in records] == ["2024/may/c.png", "a.png"]
    with pytest.raises(SourceError, match=rf"^data.source: {root}/a.png \(and 1 more\) is not in a class folder "
                                          rf"\({root}/<class>/\); move it into one or remove it$"):
        plan_source(f"folder:{root}")
    labelled = tmp_path / "labelled"  # a labelled layout without labels: the same keys as with them
    for split in ("train", "test"):
        image(str(labelled / split / "x" / "0.png"), 5)
    _, with_labels = records_of(f"folder:{labelled}")
    _, without = records_of(f"folder:{labelled}", labels=False)
    assert sorted(r.key for r in without) == sorted(r.key for r in with_labels) == ["test/x/0.png", "train/x/0.png"]
    with pytest.raises(SourceError, match=rf"^data.source: {root}/empty holds no .png/.jpg/.jpeg/.bmp/.gif/.webp/"
                                          r".tif/.tiff files, in it or below it$"):
        plan_source(f"folder:{root}/empty", labels=False)


# --- npz --------------------------------------------------------------------------------------

def test_npz_arrays_that_would_not_be_read_are_named_and_x_val_is_validation(tmp_path):
    rows = np.zeros((6, 3, 3), np.uint8)
    np.savez(tmp_path / "mixed.npz", x=rows, y=np.arange(6) % 2, x_test=rows, y_test=np.arange(6) % 2)
    with pytest.raises(SourceError, match=r"mixed.npz: arrays x_test, y_test would not be read; an .npz holds x, y "
                                          r"\(split by key hash\), or x_train, y_train .*; found x, x_test, y, y_test$"):
        plan_source(f"npz:{tmp_path / 'mixed.npz'}")
    np.savez(tmp_path / "half.npz", x_train=rows, y_train=np.arange(6) % 2, x_test=rows)
    with pytest.raises(SourceError, match="half.npz: array y_test missing"):
        plan_source(f"npz:{tmp_path / 'half.npz'}")
    np.savez(tmp_path / "val.npz", x_train=rows, y_train=np.arange(6) % 2, x_val=rows[:2] + 7, y_val=[1, 0])
    plan, records = records_of(f"npz:{tmp_path / 'val.npz'}")
    validation = [r for r in records if r.split == "validation"]
    assert plan.has_splits and [(r.key, r.label) for r in validation] == [("validation/0000000", "1"),
                                                                          ("validation/0000001", "0")]
    assert int(validation[0].payload.max()) == 7


def test_npz_labels_of_bytes_and_integral_floats_are_named_as_text_and_integers(tmp_path):
    x = np.zeros((4, 2, 2), np.uint8)
    np.savez(tmp_path / "b.npz", x=x, y=np.array([b"down", b"up", b"up", b"\xff"]))
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0.0, 1.0, 2.5, np.nan]))
    plan, records = records_of(f"npz:{tmp_path / 'b.npz'}")
    assert problems(plan, records, ("down", "up")) == ["down", "up", "up", "bad: y[3]: label b'\\xff' is not UTF-8 text"]
    plan, records = records_of(f"npz:{tmp_path / 'f.npz'}")
    assert problems(plan, records, ("0", "1", "2.5")) == ["0", "1", "2.5", "bad: y[3]: label nan is not a finite number"]


def test_without_labels_an_npz_needs_no_y(tmp_path):
    rows = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    np.savez(tmp_path / "x.npz", x=rows)
    plan, records = records_of(f"npz:{tmp_path / 'x.npz'}", labels=False)
    assert [(r.key, r.label, r.split) for r in records] == [(f"all/{i:07d}", "", None) for i in range(5)]
    np.testing.assert_array_equal(np.stack([r.payload for r in records]), rows)
    assert plan.modality == "image" and plan.input_spec.shape == (3, 3, 1) and set(plan.options["headers"]) == {"x"}
    np.savez(tmp_path / "xy.npz", x=rows, y=np.array([[1, 2]] * 5))  # a y there is not read (nor checked)
    _, records = records_of(f"npz:{tmp_path / 'xy.npz'}", labels=False)
    assert [r.label for r in records] == [""] * 5 and not any(r.problem for r in records)
    np.savez(tmp_path / "splits.npz", x_train=rows[:3], x_test=rows[3:])
    _, records = records_of(f"npz:{tmp_path / 'splits.npz'}", labels=False)
    assert [(r.key, r.split) for r in records] == [("train/0000000", "train"), ("train/0000001", "train"),
                                                   ("train/0000002", "train"), ("test/0000000", "test"),
                                                   ("test/0000001", "test")]
    with pytest.raises(SourceError, match=r"x.npz: array y missing; an .npz holds x, y \(split by key hash\), .*; "
                                          r"found x$"):
        plan_source(f"npz:{tmp_path / 'x.npz'}")  # training needs its labels, as before
    with pytest.raises(SourceError, match=r"xy.npz: y has shape \[5, 2\]; expected one label per row"):
        plan_source(f"npz:{tmp_path / 'xy.npz'}")
    np.savez(tmp_path / "y.npz", y=np.arange(5))
    with pytest.raises(SourceError, match=r"y.npz: array x missing"):
        plan_source(f"npz:{tmp_path / 'y.npz'}", labels=False)


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_a_2d_npz_read_as_images_points_to_the_sequence_modality(tmp_path, dtype):
    path = tmp_path / "series.npz"
    np.savez(path, x=np.zeros((6, 20), dtype), y=np.arange(6) % 2)
    overrides = ["data.modality=image"] if dtype == np.float32 else []  # float x is a sequence by default
    with pytest.raises(SourceError, match=rf"^{path}: image x must be \[N, H, W\] or \[N, H, W, C\], got \[6, 20\]; "
                                          r"set data.modality=sequence for series$"):
        plan_source(f"npz:{path}", load_config([], overrides).data)
    plan = plan_source(f"npz:{path}", load_config([], ["data.modality=sequence"]).data)
    assert plan.modality == "sequence" and plan.input_spec.shape == (20, 1)
    np.savez(path, x=np.zeros((6, 2, 2, 2, 2), dtype), y=np.arange(6) % 2)  # not a series: no hint
    with pytest.raises(SourceError, match=r"got \[6, 2, 2, 2, 2\]$"):
        plan_source(f"npz:{path}", load_config([], ["data.modality=image"]).data)


def test_a_sequence_value_beyond_float32_is_named_and_nan_or_infinity_as_before():
    spec = FeatureSpec("float32", (2, 2), "float_list")
    decoded = decode_array(np.array([[3.4e38, -3.4e38], [1e-50, 0.5]]), spec)  # within range: read
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, np.array([[3.4e38, -3.4e38], [0.0, 0.5]], np.float32))
    for values, message in [
        ([[0.5, 1e39], [2.0, 3.0]], "sequence value 1e+39 at [0, 1] is outside float32's range (±3.402823e+38)"),
        ([[0.5, 1.0], [-7e300, 3.0]], "sequence value -7e+300 at [1, 0] is outside float32's range (±3.402823e+38)"),
        ([[0.5, 1.0], [np.nan, 3.0]], "sequence holds NaN or infinite values"),
        ([[0.5, -np.inf], [1e39, 3.0]], "sequence holds NaN or infinite values"),
    ]:
        with pytest.raises(BadInput) as raised:
            decode_array(np.array(values, np.float64), spec)
        assert str(raised.value) == message


# --- tables -------------------------------------------------------------------------------------

def test_a_duplicated_csv_column_is_named(tmp_path):
    path = tmp_path / "dup.csv"
    write_table(path, ["text", "label", "text"], [("first", "a", "last")])
    with pytest.raises(SourceError, match=f"^data.source: {path}: column 'text' appears 2 times in the header "
                                          r"\(columns 1, 3\); rename all but one$"):
        plan_source(f"csv:{path}")


def test_csv_with_carriage_return_line_endings_is_read(tmp_path):
    path = tmp_path / "cr.csv"
    path.write_bytes("\r".join(["text,label", "one two,a", '"quoted\rcell",b', "three,a"]).encode() + b"\r")
    plan, records = records_of(f"csv:{path}")
    assert [(r.key, r.payload, r.label) for r in records] == [
        ("row/00000001", "one two", "a"), ("row/00000002", "quoted\rcell", "b"), ("row/00000003", "three", "a")]


def test_jsonl_strings_may_hold_line_separators_and_a_json_array_is_named(tmp_path):
    path = tmp_path / "ls.jsonl"
    path.write_text("".join(json.dumps({"text": f"a\u2028b\x85{i}", "label": i}, ensure_ascii=False) + "\n"
                            for i in range(3)), encoding="utf-8")
    plan, records = records_of(f"jsonl:{path}")
    assert [(r.payload, r.label) for r in records] == [(f"a\u2028b\x85{i}", str(i)) for i in range(3)]
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps([{"text": "x", "label": 0}, {"text": "y", "label": 1}], indent=1))
    with pytest.raises(SourceError, match=f"^data.source: {array} is one JSON array, not JSON lines"):
        plan_source(f"jsonl:{array}")


def test_table_labels_are_stripped_and_lists_line_breaks_and_blanks_are_dead_letters(tmp_path):
    path = tmp_path / "labels.csv"
    write_table(path, ["text", "label"], [("t", "pos"), ("t", "pos "), ("t", " "), ("t", "neg\nx"), ("t", " neg")])
    plan, records = records_of(f"csv:{path}")
    assert problems(plan, records, ("neg", "pos")) == [
        "pos", "pos", "bad: missing label",
        "bad: row 4: column 'label': label 'neg\\nx' contains a line break; class names are written one a line "
        "in labels.txt", "neg"]
    lines = tmp_path / "labels.jsonl"
    lines.write_text("".join(json.dumps({"text": "t", "label": label}) + "\n"
                             for label in ("pos", ["a"], {"k": 1}, 1.0, True, None)))
    plan, records = records_of(f"jsonl:{lines}")
    assert problems(plan, records, ("1", "True", "pos")) == [
        "pos", "bad: line 2: column 'label': label ['a'] is a list, not a string or a number",
        "bad: line 3: column 'label': label {'k': 1} is a dict, not a string or a number", "1", "True",
        "bad: missing label"]


def test_label_text_and_class_name_order():
    assert [label_text(v) for v in (" a ", b"caf\xc3\xa9", np.int64(3), np.float32(2.0), 0.5, None)] == [
        "a", "caf\u00e9", "3", "2", "0.5", ""]
    assert class_names_of(["1", "2", "\u00b2"]) == ("1", "2", "\u00b2")  # isdigit() but not int()
    assert class_names_of(["10", "9", "-1"]) == ("-1", "9", "10")


# --- whole runs -------------------------------------------------------------------------------------

def test_samples_draw_any_channel_count():
    two = np.stack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 200, np.uint8)], axis=-1)
    np.testing.assert_array_equal(displayable(two)[0, 0], [50, 50, 50, 200])
    five = np.arange(20, dtype=np.uint8).reshape(1, 4, 5)
    np.testing.assert_array_equal(displayable(five), [[0, 5, 10, 15]])
    assert displayable(five[..., :3]).shape == (1, 4, 3)


def test_a_two_channel_npz_completes_and_a_one_class_table_fails_naming_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "two.npz", x=rng.integers(0, 256, (40, 8, 8, 2), dtype=np.uint8), y=np.arange(40) % 2)
    run = tmp_path / "run2"
    assert cli.main(["preprocess", "--source", f"npz:{tmp_path / 'two.npz'}", "--run-dir", str(run),
                     "--", *IN_PROCESS_BEAM]) == 0
    assert (run / "data" / "samples.png").stat().st_size > 1000 and (run / "data" / "metadata.json").exists()
    path = tmp_path / "one.csv"
    write_table(path, ["text", "label"], [(f"words {i}", "pos") for i in range(20)])
    run = tmp_path / "run1"
    capsys.readouterr()
    assert cli.main(["preprocess", "--source", f"csv:{path}", "--run-dir", str(run), "--", *IN_PROCESS_BEAM]) == 2
    assert (f"error: data.label_column: column 'label' of csv:{path} holds one class, 'pos'; a classifier needs "
            "at least 2 classes") in capsys.readouterr().err
    assert not (run / "data" / "metadata.json").exists()
