"""Sources of raw examples, chosen by `data.source` (`kcp preprocess --source URI`).

    digits              scikit-learn's bundled 8x8 digits (the embedded default)
    folder:PATH         PATH/<class>/*.{png,jpg,jpeg,bmp,gif}, or PATH/{train,validation,test}/<class>/...
    npz:PATH            x, y  or  x_train, y_train, x_test, y_test[, x_validation, y_validation]
    csv:PATH, jsonl:PATH  text classification: data.text_column, data.label_column, data.split_column
    tfds:NAME[:SPLIT]   a prepared TensorFlow Datasets builder under data.tfds_data_dir

`plan_source` runs in the driver before the pipeline: it checks the source (a missing path,
an empty source or a missing column fails here, with one line naming it), fixes the
modality, the input spec and the class names, and lists the records. Records are small
(file paths, or rows and arrays of in-memory sources); `decode_record` turns one into a
`RawExample` inside the pipeline, raising `BadInput` for what goes to the dead letters.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from kcp.core import storage
from kcp.core.config import DataConfig
from kcp.core.errors import UserError
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLITS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
DIGITS_LEVELS = 16  # scikit-learn's digits hold integer intensities 0..16


class SourceError(UserError, ValueError):
    """A source that cannot be read; raised before the pipeline starts."""


class BadInput(ValueError):
    """One input that cannot be used; it goes to the dead letters with this message."""


@dataclass(frozen=True)
class SourceRecord:
    key: str  # stable across reruns: the split and the shard are derived from it
    payload: Any  # a file path (folder), an array (digits, npz, tfds images) or a string (text)
    label: str
    split: Optional[str] = None  # set when the source brings its own splits


@dataclass(frozen=True)
class RawExample:
    key: str
    inputs: Any  # np.ndarray of the plan's dtype and shape, or a str for text
    label: str  # class name
    split: Optional[str] = None


@dataclass(frozen=True)
class SourcePlan:
    """What the driver knows about a source before the pipeline runs."""

    uri: str
    kind: str
    modality: str
    input_feature: str
    input_spec: FeatureSpec
    class_names: tuple
    has_splits: bool


# --- helpers ------------------------------------------------------------------------------

def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """Rescales digits' 0..16 intensities to 0..255 uint8, [N, 8, 8] -> [N, 8, 8, 1]."""
    scaled = np.rint(np.asarray(images, dtype=np.float64) * (255.0 / DIGITS_LEVELS))
    return scaled.astype(np.uint8)[..., np.newaxis]


def class_names_of(labels) -> tuple:
    """Sorted class names; numerically when every label is an integer."""
    names = {str(label) for label in labels}
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _check_path(uri: str, path: str) -> None:
    if not path:
        raise SourceError(f"data.source: {uri!r} names no path")
    if not storage.exists(path):
        raise SourceError(f"data.source: {path} does not exist")


def _split_of(value, where: str) -> Optional[str]:
    if value is None or value == "":
        return None
    split = str(value).strip().lower()
    if split not in SPLITS:
        raise SourceError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return split


# --- folder ------------------------------------------------------------------------------

def _list_folder(root: str) -> list[tuple[str, str]]:
    """(path, path relative to root) of every image file one or two folders down."""
    root = root.rstrip("/")
    found = []
    if "://" in root:
        paths = set(storage.glob(f"{root}/*/*")) | set(storage.glob(f"{root}/*/*/*"))
        found = [(path, path[len(root) + 1:]) for path in paths if path[len(root) + 1:].count("/") in (1, 2)]
    else:
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                if relative.count("/") in (1, 2):
                    found.append((path, relative))
    return sorted((path, rel) for path, rel in found if rel.lower().endswith(IMAGE_EXTENSIONS))


def _image_header(path: str):
    """(height, width, has colour) from the file header, or None if it is not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path) as image:
            return image.height, image.width, image.mode not in GRAY_MODES
    except Exception:  # noqa: BLE001  an unreadable file is a dead letter later, not a planning error
        return None


def _plan_folder(uri: str, root: str, data: DataConfig):
    _check_path(uri, root)
    files = _list_folder(root)
    if not files:
        raise SourceError(f"data.source: {root} holds no {'/'.join(IMAGE_EXTENSIONS)} files in "
                          "PATH/<class>/ or PATH/<split>/<class>/")
    top = {relative.split("/")[0] for _, relative in files}
    has_splits = bool(top & set(SPLITS)) and all(relative.count("/") == 2 for _, relative in files
                                                 if relative.split("/")[0] in SPLITS)
    records = []
    for path, relative in files:
        parts = relative.split("/")
        if has_splits:
            if len(parts) != 3 or parts[0] not in SPLITS:
                continue  # files outside the split folders are not part of the data set
            records.append(SourceRecord(relative, path, parts[1], parts[0]))
        elif len(parts) == 2:
            records.append(SourceRecord(relative, path, parts[0], None))
    if not records:
        raise SourceError(f"data.source: {root} has no images in class folders")
    headers = [h for h in (_image_header(r.payload) for r in records) if h is not None]
    if not headers:
        raise SourceError(f"data.source: none of the {len(records)} files under {root} is a readable image")
    height, width = data.image_size or collections.Counter((h, w) for h, w, _ in headers).most_common(1)[0][0]
    channels = data.channels or (3 if any(colour for _, _, colour in headers) else 1)
    spec = FeatureSpec(dtype="uint8", shape=(int(height), int(width), int(channels)), encoding="raw_bytes")
    plan = SourcePlan(uri, "folder", "image", "image", spec, class_names_of(r.label for r in records), has_splits)
    return plan, records


def decode_image_file(path: str, shape: tuple) -> np.ndarray:
    """Reads and decodes one image file to uint8 [H, W, C] of `shape` (resized, converted)."""
    from PIL import Image, UnidentifiedImageError

    content = storage.read_bytes(path)
    if not content:
        raise BadInput("empty file")
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            image = image.convert("RGB" if shape[2] == 3 else "L")
            if image.size != (shape[1], shape[0]):
                image = image.resize((shape[1], shape[0]), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadInput(f"not a decodable image ({type(error).__name__}: {error})") from None
    return array.reshape(shape)


# --- npz ----------------------------------------------------------------------------------

def _plan_npz(uri: str, path: str, data: DataConfig):
    _check_path(uri, path)
    try:
        arrays = dict(np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False))
    except (ValueError, OSError) as error:
        raise SourceError(f"data.source: {path} is not a NumPy .npz archive ({error})") from None
    if "x" in arrays and "y" in arrays:
        parts = {None: (arrays["x"], arrays["y"])}
    else:
        parts = {split: (arrays[f"x_{split}"], arrays[f"y_{split}"]) for split in SPLITS
                 if f"x_{split}" in arrays and f"y_{split}" in arrays}
        if "train" not in parts:
            raise SourceError(f"{path}: expected arrays x and y, or x_train and y_train "
                              f"(with x_test, y_test and optionally x_validation, y_validation); found "
                              f"{', '.join(sorted(arrays)) or 'none'}")
    first = next(iter(parts.values()))[0]
    for split, (x, y) in parts.items():
        if len(x) != len(y):
            raise SourceError(f"{path}: x{'_' + split if split else ''} has {len(x)} rows but y has {len(y)}")
        if x.shape[1:] != first.shape[1:]:
            raise SourceError(f"{path}: x shapes differ between splits ({first.shape[1:]} and {x.shape[1:]})")
    modality = data.modality or ("sequence" if np.issubdtype(first.dtype, np.floating) else "image")
    if modality == "image":
        if first.ndim not in (3, 4):
            raise SourceError(f"{path}: image x must be [N, H, W] or [N, H, W, C], got {list(first.shape)}")
        shape = tuple(first.shape[1:]) + ((1,) if first.ndim == 3 else ())
        spec = FeatureSpec("uint8", shape, "raw_bytes")
    elif modality == "sequence":
        if first.ndim not in (2, 3):
            raise SourceError(f"{path}: sequence x must be [N, T] or [N, T, F], got {list(first.shape)}")
        shape = tuple(first.shape[1:]) + ((1,) if first.ndim == 2 else ())
        spec = FeatureSpec("float32", shape, "float_list")
    else:
        raise SourceError(f"data.modality: npz sources hold images or sequences, not {modality}")
    records = []
    for split, (x, y) in parts.items():
        prefix = split or "all"
        records += [SourceRecord(f"{prefix}/{index:07d}", row, str(label.item() if hasattr(label, "item") else label),
                                 split) for index, (row, label) in enumerate(zip(x, y))]
    labels = [r.label for r in records]
    plan = SourcePlan(uri, "npz", modality, modality, spec, class_names_of(labels), None not in parts)
    return plan, records


def decode_array(array, spec: FeatureSpec) -> np.ndarray:
    """Checks one in-memory example against the spec and converts it."""
    array = np.asarray(array)
    if array.shape != spec.shape and array.shape + (1,) == spec.shape:
        array = array[..., np.newaxis]
    if array.shape != spec.shape:
        raise BadInput(f"shape {list(array.shape)} is not {list(spec.shape)}")
    if spec.dtype == "uint8":
        if not np.issubdtype(array.dtype, np.integer):
            raise BadInput(f"image values of dtype {array.dtype} are not integers")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise BadInput(f"image values {array.min()}..{array.max()} are outside 0..255")
        return array.astype(np.uint8)
    values = array.astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise BadInput("sequence holds NaN or infinite values")
    return values


# --- text: csv, jsonl -------------------------------------------------------------------

def _plan_text_table(uri: str, kind: str, path: str, data: DataConfig):
    _check_path(uri, path)
    content = storage.read_bytes(path).decode("utf-8-sig")
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(content))
        columns = reader.fieldnames or []
        rows = list(reader)
    else:
        rows = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    rows.append({"__bad__": f"line {number}: not JSON ({error.msg})"})
        columns = sorted({key for row in rows for key in row if key != "__bad__"})
    if not rows:
        raise SourceError(f"data.source: {path} holds no rows")
    for option, column in (("data.text_column", data.text_column), ("data.label_column", data.label_column)):
        if column not in columns:
            raise SourceError(f"{option}: column {column!r} is not in {path} (it has {', '.join(columns) or 'none'})")
    use_split = data.split_column in columns
    records = []
    for number, row in enumerate(rows, start=1):
        key = f"row/{number:08d}"
        if "__bad__" in row:
            records.append(SourceRecord(key, None, "", None))  # decoded as a dead letter
            continue
        split = _split_of(row.get(data.split_column), f"{path} row {number}") if use_split else None
        label = row.get(data.label_column)
        records.append(SourceRecord(key, row.get(data.text_column), "" if label is None else str(label), split))
    labels = [r.label for r in records if r.label]
    if not labels:
        raise SourceError(f"data.label_column: column {data.label_column!r} of {path} is empty")
    has_splits = use_split and any(r.split for r in records)
    spec = FeatureSpec("string", (), "utf8")
    return SourcePlan(uri, kind, "text", "text", spec, class_names_of(labels), has_splits), records


def decode_text(text) -> str:
    if not isinstance(text, str):
        raise BadInput("no text" if text is None else f"text is {type(text).__name__}, not a string")
    if not text.strip():
        raise BadInput("empty text")
    return text


# --- tfds ---------------------------------------------------------------------------------

def _plan_tfds(uri: str, spec_text: str, data: DataConfig):
    import tensorflow_datasets as tfds

    name, _, split_name = spec_text.partition(":")
    data_dir = data.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001  tfds raises many types for unknown names
        raise SourceError(f"data.source: {name!r} is not a TensorFlow Datasets builder ({error})") from None
    if not builder.is_prepared():
        raise SourceError(f"data.source: tfds {name!r} is not prepared in {data_dir}; prepare it with "
                          f"`tfds build {name} --data_dir {data_dir}` (or `python -c \"import tensorflow_datasets "
                          f"as tfds; tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"`)")
    keys = builder.info.supervised_keys
    if not keys or len(keys) < 2:
        raise SourceError(f"data.source: tfds {name!r} has no supervised (input, label) keys")
    input_key, label_key = keys[0], keys[1]
    features = builder.info.features
    label_feature = features[label_key]
    names = list(getattr(label_feature, "names", []) or [])
    available = list(builder.info.splits.keys())
    wanted = [split_name] if split_name else available
    if not wanted:
        raise SourceError(f"data.source: tfds {name!r} lists no splits; name one, e.g. tfds:{name}:train")
    mapping = {"train": "train", "validation": "validation", "valid": "validation", "test": "test"}
    records = []
    for tfds_split in wanted:
        if available and tfds_split not in available:
            raise SourceError(f"data.source: tfds {name!r} has no split {tfds_split!r} ({', '.join(available)})")
        ours = mapping.get(tfds_split) if not split_name else None
        for index, example in enumerate(tfds.as_numpy(builder.as_dataset(split=tfds_split))):
            value, label = example[input_key], example[label_key]
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            label = names[int(label)] if names else str(label.item() if hasattr(label, "item") else label)
            records.append(SourceRecord(f"{tfds_split}/{index:08d}", value, label, ours))
    if not records:
        raise SourceError(f"data.source: tfds {name!r} split {split_name or 'all'} is empty")
    has_splits = any(r.split for r in records)
    if isinstance(records[0].payload, str):
        spec, modality = FeatureSpec("string", (), "utf8"), "text"
    else:
        shape = tuple(np.asarray(records[0].payload).shape)
        if len(shape) != 3:
            raise SourceError(f"data.source: tfds {name!r} input {input_key!r} has shape {list(shape)}; "
                              "expected an image [H, W, C] or text")
        spec, modality = FeatureSpec("uint8", shape, "raw_bytes"), "image"
    class_names = tuple(names) if names else class_names_of(r.label for r in records)
    return SourcePlan(uri, "tfds", modality, modality, spec, class_names, has_splits), records


# --- entry points ------------------------------------------------------------------------

def plan_source(uri: str, data: DataConfig | None = None) -> tuple[SourcePlan, list[SourceRecord]]:
    """Checks a source URI and lists its records; one-line SourceError when it cannot be read."""
    data = data or DataConfig()
    kind, _, rest = uri.partition(":")
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        records = [SourceRecord(f"digits/{index:04d}", image, str(int(target)))
                   for index, (image, target) in enumerate(zip(digits_to_uint8(digits.images), digits.target))]
        spec = FeatureSpec(dtype="uint8", shape=(8, 8, 1), encoding="raw_bytes")
        plan = SourcePlan(uri, "digits", "image", "image", spec, tuple(str(d) for d in range(10)), False)
    elif kind == "folder":
        plan, records = _plan_folder(uri, rest, data)
    elif kind == "npz":
        plan, records = _plan_npz(uri, rest, data)
    elif kind in ("csv", "jsonl"):
        plan, records = _plan_text_table(uri, kind, rest, data)
    elif kind == "tfds":
        plan, records = _plan_tfds(uri, rest, data)
    else:
        raise SourceError(f"data.source: {uri!r} is not a known source; allowed: digits, folder:PATH, npz:PATH, "
                          "csv:PATH, jsonl:PATH, tfds:NAME[:SPLIT]")
    if data.limit:
        records = records[:data.limit]
    return plan, records


def decode_record(plan: SourcePlan, record: SourceRecord) -> RawExample:
    """Turns a listed record into a RawExample; raises BadInput for a dead letter."""
    if record.label == "" or record.label not in plan.class_names:
        raise BadInput("missing label" if record.label == "" else f"unknown label {record.label!r}")
    if plan.modality == "text":
        inputs = decode_text(record.payload)
    elif plan.kind == "folder":
        inputs = decode_image_file(record.payload, plan.input_spec.shape)
    else:
        inputs = decode_array(record.payload, plan.input_spec)
    return RawExample(record.key, inputs, record.label, record.split)
