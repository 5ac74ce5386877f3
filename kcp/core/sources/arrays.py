"""In-memory arrays: the `npz:PATH` source, and the check of one array against the input spec
(used for every source that holds its inputs as arrays: digits, npz, tfds images)."""

from __future__ import annotations

import io

import numpy as np

from kcp.core import storage
from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLITS
from kcp.core.sources.base import BadInput, SourceError, SourcePlan, SourceRecord, check_path, class_names_of


def plan_npz(uri: str, path: str, data: DataConfig):
    check_path(uri, path)
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
