"""What a user's raw data holds beyond the happy path: layouts, array names, headers, line
endings and labels. Each case lost data silently or crashed before; now it is read, a dead
letter with its reason, or a one-line error naming the file, the key and the value."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kcp import cli
from kcp.core.config_load import load_config
from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.sources import (BadInput, SourceError, class_names_of, decode_array, decode_record, plan_source,
                              read_task)
from kcp.core.sources.base import label_text
from pipeline.preprocess import plan_lines, run_preprocess
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


def test_webp_and_tiff_images_train_but_the_plan_warns_that_the_export_cannot_take_them(tmp_path):
    """The export's image_bytes input (tf.io.decode_image) decodes PNG, JPEG, GIF and BMP only."""
    root = tmp_path / "images"
    for label in "ab":
        for index in range(3):
            image(str(root / label / f"{index}.png"), index)
    image(str(root / "a" / "w.webp"), 30, format="WEBP", lossless=True)
    image(str(root / "b" / "deep" / "t.TIFF"), 40, format="TIFF")
    image(str(root / "b" / "u.tif"), 50, format="TIFF")
    plan = plan_source(f"folder:{root}")
    assert plan.options["unserved"] == 3 and plan.options["unserved_examples"] == ("a/w.webp", "b/deep/t.TIFF")
    assert plan_lines(plan)[1:] == [
        "warning: 3 of the 9 images read are .webp/.tif/.tiff files (e.g. a/w.webp, b/deep/t.TIFF): they train, but "
        "the export's image_bytes input decodes PNG/JPEG/GIF/BMP only, so such files cannot be sent to the served "
        "model (convert them; serve_images takes decoded pixels)"]
    limited = plan_source(f"folder:{root}", load_config([], ["data.limit=5"]).data)  # a/0-2.png, a/w.webp, b/0.png
    assert limited.options["unserved"] == 1 and plan_lines(limited)[1].startswith("warning: 1 of the 5 images read")
    for path in ("a/w.webp", "b/deep/t.TIFF", "b/u.tif"):
        os.remove(root / path)
    assert len(plan_lines(plan_source(f"folder:{root}"))) == 1  # PNG only: the plan line, no warning


def test_an_empty_class_folder_and_a_name_that_is_not_utf8_are_named(tmp_path):
    root = tmp_path / "images"
    image(str(root / "a" / "0.png"), 1)
    (root / "b").mkdir()
    (root / "b" / "list.csv").write_text("x")
    with pytest.raises(SourceError, match=f"^data.source: class folder {root}/b holds no .png/.jpg/.jpeg/.bmp/"
                                          ".gif/.webp/.tif/.tiff files; add images or remove it$"):
        plan_source(f"folder:{root}")
    (root / "b" / "review.txt").write_text("great")  # text in class folders: where text goes instead
    with pytest.raises(SourceError, match=r"add images or remove it; folder: reads images: for text, make a csv: or "
                                          r"jsonl: table of a text and a label column \(docs/data.md\)$"):
        plan_source(f"folder:{root}")
    os.remove(root / "b" / "review.txt")
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
    os.symlink(tmp_path / "nowhere.png", labelled / "gone.png")  # beside the class folders: named as what it is
    with pytest.raises(SourceError, match=rf"^data.source: {labelled}/gone.png is a broken link outside the class "
                                          r"folders; remove it$"):
        plan_source(f"folder:{labelled}")
    os.remove(labelled / "gone.png")
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


def test_an_npz_y_of_shape_n_1_is_read_as_n_and_only_n_c_gets_the_one_hot_hint(tmp_path):
    """keras.datasets.cifar10 returns y as [N, 1]; argmax(axis=1) of that would make every label 0."""
    x = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    np.savez(tmp_path / "col.npz", x=x, y=np.array([[3], [7], [3], [7], [7]]))
    plan, records = records_of(f"npz:{tmp_path / 'col.npz'}")
    assert [(r.key, r.label) for r in records] == [(f"all/{i:07d}", label) for i, label in enumerate("37377")]
    assert problems(plan, records, ("3", "7")) == ["3", "7", "3", "7", "7"]
    np.savez(tmp_path / "seq.npz", x_train=np.zeros((3, 4, 2), np.float32), y_train=np.array([[0.0], [1.0], [2.0]]))
    _, records = records_of(f"npz:{tmp_path / 'seq.npz'}")
    assert [(r.key, r.label, r.split) for r in records] == [(f"train/{i:07d}", str(i), "train") for i in range(3)]
    np.savez(tmp_path / "hot.npz", x=x, y=np.eye(5, 2))
    with pytest.raises(SourceError, match=r"^.*hot.npz: y has shape \[5, 2\]; expected one label per row, shape "
                                          r"\[N\] or \[N, 1\] \(for one-hot labels save y.argmax\(axis=1\)\)$"):
        plan_source(f"npz:{tmp_path / 'hot.npz'}")
    np.savez(tmp_path / "cube.npz", x=x, y=np.zeros((5, 1, 1)))
    with pytest.raises(SourceError, match=r"cube.npz: y has shape \[5, 1, 1\]; expected one label per row, shape \[N\] "
                                          r"or \[N, 1\]$"):
        plan_source(f"npz:{tmp_path / 'cube.npz'}")


def test_npz_images_that_are_not_uint8_fail_at_planning_naming_the_dtype_values_and_the_fix(tmp_path):
    """Before, every row was a dead letter and the job failed on data.max_bad_fraction."""
    path = tmp_path / "i.npz"
    cases = [
        (np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8) * 16, [],  # 12-bit images: 0..4080
         "image x is uint16 with values 0..4080 in its first 4 rows; images are read as uint8 0..255 (every row would "
         "be a dead letter): scale it, e.g. save (x * (255 / x.max())).round().astype('uint8'); or, if x holds "
         "series, set data.modality=sequence"),
        (np.linspace(0, 1, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3), ["data.modality=image"],
         "image x is float32 with values 0..1 in its first 4 rows; images are read as uint8 0..255 (every row would be "
         "a dead letter): save (x * 255).round().astype('uint8')"),
        (np.full((4, 8, 8), 200.0), ["data.modality=image"],
         "image x is float64 with values 200..200 in its first 4 rows; images are read as uint8 0..255 (every row "
         "would be a dead letter): save x.round().astype('uint8')"),
        (np.where(np.arange(4 * 64).reshape(4, 8, 8) % 50 == 0, np.nan, 0.5), ["data.modality=image"],
         "image x is float64 with values 0.5..0.5 and 6 NaN or infinite in its first 4 rows; images are read as uint8 "
         "0..255 (every row would be a dead letter): replace them first (e.g. np.nan_to_num(x, nan=0.0, posinf=0.0, "
         "neginf=0.0)), then save (x * 255).round().astype('uint8')"),
        (np.full((4, 8, 8), np.nan), ["data.modality=image"],
         "image x is float64 with no finite values and 256 NaN or infinite in its first 4 rows; images are read as "
         "uint8 0..255 (every row would be a dead letter): replace them first (e.g. np.nan_to_num(x, nan=0.0, "
         "posinf=0.0, neginf=0.0)), then save (x * 255).round().astype('uint8')"),
        (np.full((4, 8, 8), -3, np.int16), [],
         "image x is int16 with values -3..-3 in its first 4 rows; images are read as uint8 0..255 (every row would be "
         "a dead letter): shift and scale it, e.g. save ((x - x.min()) * (255 / (x.max() - x.min()))).round()"
         ".astype('uint8'); or, if x holds series, set data.modality=sequence"),
        (np.zeros((4, 8, 8, 3), np.float32), [],  # float is a sequence unless told: a 4-D one is named as images
         "sequence x must be [N, T] or [N, T, F], got [4, 8, 8, 3]; for images [N, H, W, C], save x as uint8 0..255 "
         "(float x is read as sequences unless data.modality=image)"),
        (np.zeros((4, 8, 8, 4), np.uint8), [],  # RGBA: it trained, then the export's decoder failed on every row
         "image x has 4 channels ([4, 8, 8, 4]); images have 1 (grayscale) or 3 (RGB), as an image folder's are "
         "read: for RGBA keep x[..., :3]"),
        (np.zeros((4, 8, 8, 2), np.uint8), [],
         "image x has 2 channels ([4, 8, 8, 2]); images have 1 (grayscale) or 3 (RGB), as an image folder's are "
         "read: for RGBA keep x[..., :3]"),
    ]
    for x, overrides, message in cases:
        np.savez(path, x=x, y=np.arange(4) % 2)
        with pytest.raises(SourceError) as raised:
            plan_source(f"npz:{path}", load_config([], overrides).data)
        assert str(raised.value) == f"{path}: {message}"
    np.savez(path, x=np.zeros((4, 0, 3), np.float32), y=np.arange(4) % 2)
    with pytest.raises(SourceError, match=r"x has shape \[4, 0, 3\], an empty dimension"):
        plan_source(f"npz:{path}")
    np.savez(path, x=np.full((4, 8, 8), 255, np.int64), y=np.arange(4) % 2)  # wider integers of 0..255 are read
    plan, records = records_of(f"npz:{path}")
    assert plan.modality == "image" and decode_record(plan, records[0], ("0", "1")).inputs.max() == 255


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
        ([[0.5, 1.0], [np.nan, 3.0]], "sequence holds NaN or infinite values (nan at [1, 0]); fill missing values, "
                                      "and pad shorter series with a number such as 0, not NaN"),
        ([[0.5, -np.inf], [1e39, 3.0]], "sequence holds NaN or infinite values (-inf at [0, 1]); fill missing "
                                        "values, and pad shorter series with a number such as 0, not NaN"),
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
        "pos", "pos", "bad: row 3 (line 4): column 'label': missing label",
        "bad: row 4 (line 5): column 'label': label 'neg\\nx' contains a line break; class names are written one a line "
        "in labels.txt", "neg"]
    lines = tmp_path / "labels.jsonl"
    lines.write_text("".join(json.dumps({"text": "t", "label": label}) + "\n"
                             for label in ("pos", ["a"], {"k": 1}, 1.0, True, None)))
    plan, records = records_of(f"jsonl:{lines}")
    assert problems(plan, records, ("1", "True", "pos")) == [
        "pos", "bad: line 2: column 'label': label ['a'] is a list, not a string or a number",
        "bad: line 3: column 'label': label {'k': 1} is a dict, not a string or a number", "1", "True",
        "bad: line 6: column 'label': missing label"]


@pytest.mark.parametrize("name, content, looks", [
    ("t.tsv", "text\tlabel\nnice\tpos\n", ("tab", "'\\t'")),
    ("t.csv", "text;label\nnice;pos\n", ("semicolon", "';'")),
    ("p.csv", "text|label\nnice|pos\n", ("pipe", "'|'")),
])
def test_a_tab_or_semicolon_separated_file_is_named_as_such(tmp_path, name, content, looks):
    path = tmp_path / name
    path.write_text(content)
    header = content.split("\n")[0]
    with pytest.raises(SourceError) as raised:
        plan_source(f"csv:{path}")
    assert str(raised.value) == (
        f"data.text_column: column 'text' is not in {path} (it has {header}); the header looks {looks[0]}-separated, "
        f"and csv: reads comma-separated files only: save it with commas, e.g. pandas.read_csv(PATH, sep={looks[1]})"
        ".to_csv(NEW_PATH, index=False)")
    path.write_text("review\nnice\n")  # one column, no separator in it: no hint
    with pytest.raises(SourceError, match=r"column 'text' is not in .* \(it has review\)$"):
        plan_source(f"csv:{path}")


def test_csv_label_cells_name_floats_as_json_numbers_and_missing_markers_are_missing(tmp_path):
    cells = ["1", "1.0", " 2.0 ", "0.50", "1e1", "-0.0", "007", "NA", "nan", "N/A", "null", "None", "NULL", "#N/A",
             "<NA>", "n/a", "pos", "1.5.0", "inf", "none", "na", "Null"]
    path = tmp_path / "cells.csv"
    write_table(path, ["text", "label"], [(f"t{i}", cell) for i, cell in enumerate(cells)])
    plan, records = records_of(f"csv:{path}")
    assert [r.label for r in records] == ["1", "1", "2", "0.50", "10", "0", "007"] + [""] * 9 + [
        "pos", "1.5.0", "inf", "none", "na", "Null"]  # pandas' markers are matched as written
    assert problems(plan, records[7:9], ("1",)) == ["bad: row 8 (line 9): column 'label': missing label",
                                                    "bad: row 9 (line 10): column 'label': missing label"]
    assert [label_text(value, cell=True) for value in ("3.0", "  NA ", "1E2", ".5", "3.10")] == [
        "3", "", "100", ".5", "3.10"]  # whole numbers only: `3.10` is not merged with `3.1`
    assert [label_text(value) for value in ("3.0", "NA")] == ["3.0", "NA"]  # a JSON string is kept as written
    lines = tmp_path / "cells.jsonl"
    lines.write_text("".join(json.dumps({"text": "t", "label": v}) + "\n" for v in (1, 1.0, "1.0", "NA", None)))
    _, records = records_of(f"jsonl:{lines}")
    assert [r.label for r in records] == ["1", "1", "1.0", "NA", ""]


def test_a_jsonl_number_as_text_reads_as_its_csv_cell_and_other_types_are_dead_letters(tmp_path):
    """Product codes written by `DataFrame.to_json(lines=True)` are JSON numbers: every such row
    was a dead letter (`text is int, not a string`) though the same frame as CSV read fine."""
    lines = tmp_path / "codes.jsonl"
    values = [40213, 2.5, 40213.0, "A-7", True, None, [1], {"k": 1}]
    lines.write_text("".join(json.dumps({"text": value, "label": "a"}) + "\n" for value in values))
    plan, records = records_of(f"jsonl:{lines}")
    decoded = []
    for record in records:
        try:
            decoded.append(decode_record(plan, record, ("a",)).inputs)
        except BadInput as error:
            decoded.append(f"bad: {error}")
    assert decoded == ["40213", "2.5", "40213.0", "A-7"] + [
        f"bad: line {number}: column 'text': {reason}" for number, reason in
        [(5, "text is bool, not a string"), (6, "no text"), (7, "text is list, not a string"),
         (8, "text is dict, not a string")]]


def test_jsonl_fields_inside_objects_are_named_with_dots(tmp_path):
    """An API's export nests its fields (`{"ticket": {"body": …}}`); `data.text_column:
    ticket.body` could not reach them, and the error listed only `ticket`."""
    lines = tmp_path / "nested.jsonl"
    rows = [{"id": 1, "ticket": {"body": "refund please", "meta": {"queue": "billing"}}},
            {"id": 2, "ticket": {"body": "cannot sign in", "meta": {"queue": "login"}}},
            {"id": 3, "ticket": {"meta": {"queue": "login"}}},  # no body: a dead letter
            {"id": 4, "ticket.body": "a flat key with a dot wins", "ticket": {"body": "not this",
                                                                           "meta": {"queue": "billing"}}}]
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    plan, records = records_of(f"jsonl:{lines}", "data.text_column=ticket.body", "data.label_column=ticket.meta.queue")
    decoded = []
    for record in records:
        try:
            example = decode_record(plan, record, ("billing", "login"))
            decoded.append((example.inputs, example.label))
        except BadInput as error:
            decoded.append(f"bad: {error}")
    assert decoded == [("refund please", "billing"), ("cannot sign in", "login"),
                       "bad: line 3: column 'ticket.body': no text", ("a flat key with a dot wins", "billing")]
    with pytest.raises(SourceError) as raised:
        plan_source(f"jsonl:{lines}", DataConfig(text_column="body"))
    assert str(raised.value) == (f"data.text_column: column 'body' is not in the first lines of {lines} (it has id, "
                                 "ticket, ticket.body, ticket.meta, ticket.meta.queue)")


def test_data_modality_on_a_source_that_is_not_npz_is_refused_not_ignored(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"sequence": [[1.0, 2.0]], "label": "a"}) + "\n")
    with pytest.raises(SourceError) as error:
        plan_source(f"jsonl:{path}", DataConfig(modality="sequence"))
    assert str(error.value) == (f"data.modality: 'sequence' applies to npz sources; jsonl:{path} holds text; series go "
                                "in an npz (x [N, T, F]) (set data.modality=null)")
    with pytest.raises(SourceError, match=r"data.modality: 'text' applies to npz sources; digits holds image \(set"):
        plan_source("digits", DataConfig(modality="text"))
    assert plan_source("digits", DataConfig(modality="image")).modality == "image"  # what it holds: fine


def test_label_text_and_class_name_order():
    assert [label_text(v) for v in (" a ", b"caf\xc3\xa9", np.int64(3), np.float32(2.0), 0.5, None)] == [
        "a", "caf\u00e9", "3", "2", "0.5", ""]
    assert class_names_of(["1", "2", "\u00b2"]) == ("1", "2", "\u00b2")  # isdigit() but not int()
    assert class_names_of(["10", "9", "-1"]) == ("-1", "9", "10")


def test_class_names_of_equal_value_have_one_order_whatever_the_hash_seed():
    """`01` and `1` (`007` and `7`) are equal as integers: their order came from a set's iteration
    order, which Python's per-process hash seed changes, so reruns wrote other labels.txt and shards."""
    script = "from kcp.core.sources import class_names_of; print(class_names_of(['1', '01', '2', '007', '7', '10']))"
    orders = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True).stdout for seed in range(6)}
    assert orders == {"('01', '1', '2', '007', '7', '10')\n"}


# --- whole runs -------------------------------------------------------------------------------------

def test_samples_draw_any_channel_count():
    two = np.stack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 200, np.uint8)], axis=-1)
    np.testing.assert_array_equal(displayable(two)[0, 0], [50, 50, 50, 200])
    five = np.arange(20, dtype=np.uint8).reshape(1, 4, 5)
    np.testing.assert_array_equal(displayable(five), [[0, 5, 10, 15]])
    assert displayable(five[..., :3]).shape == (1, 4, 3)


def test_a_two_channel_npz_is_refused_and_a_one_class_table_fails_naming_it(tmp_path, capsys):
    rng = np.random.default_rng(0)  # 2 channels used to preprocess and train, then fail in the export's decoder
    np.savez(tmp_path / "two.npz", x=rng.integers(0, 256, (40, 8, 8, 2), dtype=np.uint8), y=np.arange(40) % 2)
    run = tmp_path / "run2"
    assert cli.main(["preprocess", "--source", f"npz:{tmp_path / 'two.npz'}", "--run-dir", str(run),
                     "--", *IN_PROCESS_BEAM]) == 2
    assert "image x has 2 channels ([40, 8, 8, 2])" in capsys.readouterr().err and not run.exists()
    path = tmp_path / "one.csv"
    write_table(path, ["text", "label"], [(f"words {i}", "pos") for i in range(20)])
    run = tmp_path / "run1"
    capsys.readouterr()
    assert cli.main(["preprocess", "--source", f"csv:{path}", "--run-dir", str(run), "--", *IN_PROCESS_BEAM]) == 2
    assert (f"error: data.label_column: column 'label' of csv:{path} holds one class, 'pos'; a classifier needs "
            "at least 2 classes") in capsys.readouterr().err
    assert not (run / "data" / "metadata.json").exists()

    # half the rows unreadable (cp1252, not UTF-8), all of them one class: the bad fraction is the error,
    # not "one class", which would send the user to fix their labels
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"text,label\n" + b"".join(f"tr\xe8s {i},pos\n".encode("cp1252") if i % 2 else
                                                 f"plain {i},neg\n".encode() for i in range(20)))
    run = tmp_path / "run3"
    assert cli.main(["preprocess", "--source", f"csv:{path}", "--run-dir", str(run), "--", *IN_PROCESS_BEAM]) == 2
    assert ("error: data.max_bad_fraction: 10 of 20 inputs (50.0%) could not be read, above 1.0%; reasons in "
            f"{run / 'data' / 'dead_letter'}") in capsys.readouterr().err


def test_a_table_of_1_and_1_0_labels_gives_two_classes_and_an_empty_validation_split_is_warned_about(tmp_path):
    """12 rows split by the key hash into 10 train, 0 validation, 2 test (rows 3 and 8): `1` and `1.0`
    are one class, and the `NA`, `nan` and `N/A` cells are missing labels, counted as dead letters."""
    labels = ["0", "1.0", "1", "0.0", "NA", "1", "nan", "0", " 1.0 ", "0", "N/A", "1"]
    path = tmp_path / "float_labels.csv"
    write_table(path, ["text", "label"], [(f"review {i} {'good' if label.strip() in ('1', '1.0') else 'bad'}", label)
                                          for i, label in enumerate(labels, start=1)])
    lines = []
    config = load_config([], [f"data.source=csv:{path}", "data.min_count=1", "data.max_bad_fraction=0.3"])
    contract = run_preprocess(config, str(tmp_path / "run"), IN_PROCESS_BEAM, report=lines.append)
    assert contract.class_names == ("0", "1") and contract.statistics["class_counts"] == {"0": 3, "1": 4}
    assert {split: info.count for split, info in contract.splits.items()} == {"train": 7, "validation": 0, "test": 2}
    assert contract.bad_examples == 3
    letters = [json.loads(line) for letter in (tmp_path / "run" / "data" / "dead_letter").iterdir()
               for line in letter.read_text().splitlines()]
    assert sorted((letter["key"], letter["reason"]) for letter in letters) == [
        ("row/00000005", "row 5 (line 6): column 'label': missing label"),
        ("row/00000007", "row 7 (line 8): column 'label': missing label"),
        ("row/00000011", "row 11 (line 12): column 'label': missing label")]
    assert lines[-1] == ("warning: the validation split is empty (train 7, validation 0, test 2 examples written, "
                         "data.split [0.8, 0.1, 0.1]): early stopping, the best checkpoint and plateau will monitor "
                         "the train metrics; set data.split to a larger validation share, or add data")
    assert sum(line.startswith("warning:") for line in lines) == 1
