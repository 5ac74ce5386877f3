"""In-memory arrays: the `npz:PATH` source, and the check of one array against the input spec
(used for every source that holds its inputs as arrays: digits, npz, tfds images).

The driver reads only the archive's directory and each array's .npy header (shape, dtype,
where its data starts); the workers read row ranges of x and y from there. Without labels
(batch prediction) the y arrays may be missing and are never read: an archive of `x` alone
(or `x_train`, `x_test`, ...) is enough.
"""

from __future__ import annotations

import zipfile

import numpy as np

from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLIT_NAMES, SPLITS
from kcp.core.sources.base import (BadInput, SourceError, SourcePlan, SourceRecord, check_path, label_text,
                                   open_binary, ranges)

TASK_BYTES = 16 * 2**20  # rows of x per read task


def _headers(path: str) -> dict:
    """{array name: (shape, dtype, data offset in its member)} of an .npz archive."""
    arrays = {}
    try:
        with open_binary(path) as handle, zipfile.ZipFile(handle) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = reader(stream)
                    if dtype.hasobject:
                        raise SourceError(f"{path}: array {member[:-4]} holds Python objects; save plain "
                                          "numeric or string arrays (series of different lengths: pad them to "
                                          "one length with a number such as 0)")
                    if fortran and len(shape) > 1:
                        raise SourceError(f"{path}: array {member[:-4]} is in Fortran order; save it with "
                                          "np.ascontiguousarray")
                    arrays[member[:-4]] = (tuple(shape), dtype, stream.tell())
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        if isinstance(error, SourceError):
            raise
        hint = "; a .npy holds one array: save the inputs and labels together, np.savez(PATH, x=x, y=y)" \
            if path.lower().endswith(".npy") else ""
        raise SourceError(f"data.source: {path} is not a NumPy .npz archive ({error}){hint}") from None
    return arrays


def read_rows(path: str, name: str, header, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one array of the archive, read from its .npy data."""
    shape, dtype, offset = header
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with open_binary(path) as handle, zipfile.ZipFile(handle) as archive, archive.open(f"{name}.npy") as stream:
        stream.seek(offset + start * row_bytes)
        content = stream.read((stop - start) * row_bytes)
    return np.frombuffer(content, dtype=dtype).reshape((stop - start,) + tuple(shape[1:]))


UNDERSTOOD = ("x, y (split by key hash), or x_train, y_train with optional x_validation, y_validation (or x_val, "
              "y_val) and x_test, y_test")


def _parts(path: str, arrays: dict, labels: bool = True) -> dict:
    """{split (None: by key hash): (x name, y name)}; a one-line error for an array that would go unused.
    Without `labels` a missing y is no error (its name is still given; the y arrays are not read)."""
    found = ", ".join(sorted(arrays)) or "none"
    if "x" in arrays or "y" in arrays:
        parts = {None: ("x", "y")}
    else:
        parts = {}
        for suffix, split in SPLIT_NAMES.items():  # x_<suffix>, y_<suffix> -> split
            if f"x_{suffix}" not in arrays and f"y_{suffix}" not in arrays:
                continue
            if split in parts:
                raise SourceError(f"{path}: both {parts[split][0]} and x_{suffix} are the {split} split; keep one")
            parts[split] = (f"x_{suffix}", f"y_{suffix}")
        if not labels and not parts:
            raise SourceError(f"{path}: expected an array x, or x_train, x_test, ... (no y needed to predict); "
                              f"found {found}")
        if labels and "train" not in parts:
            raise SourceError(f"{path}: expected arrays x and y, or x_train and y_train "
                              f"(with x_test, y_test and optionally x_validation, y_validation); found {found}")
    used = {name for pair in parts.values() for name in pair}
    needed = used if labels else {x_name for x_name, _ in parts.values()}
    missing = sorted(needed - set(arrays))
    if missing:
        raise SourceError(f"{path}: array{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing; an .npz "
                          f"holds {UNDERSTOOD}; found {found}")
    unused = sorted(set(arrays) - used)
    if unused:
        raise SourceError(f"{path}: array{'s' if len(unused) > 1 else ''} {', '.join(unused)} would not be read; "
                          f"an .npz holds {UNDERSTOOD}; found {found}")
    return {split: parts[split] for split in (None, *SPLITS) if split in parts}


SAMPLE_BYTES = 1 << 20  # of each image x, read by the driver to name its values when they are not uint8 0..255


def _check_image_values(path: str, x_name: str, header, guessed: bool = False) -> None:
    """A one-line SourceError, at planning, for image x that every row would fail on: a dtype that is
    not an integer (float images), or integers outside 0..255 (16-bit images) in its first rows (at
    most SAMPLE_BYTES). uint8 is not read; rows past the sample are still checked one by one."""
    shape, dtype, _ = header
    if dtype == np.uint8 or not shape[0]:
        return
    if dtype.kind not in "biuf":  # strings, complex numbers, dates: no image values at all
        raise SourceError(f"{path}: image {x_name} is {dtype}; images are read as uint8 0..255 (every row would be "
                          "a dead letter): save it as uint8")
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    rows = max(1, min(shape[0], SAMPLE_BYTES // row_bytes))
    sample = read_rows(path, x_name, header, 0, rows)
    integers = np.issubdtype(dtype, np.integer)
    if integers and (not sample.size or (sample.min() >= 0 and sample.max() <= 255)):
        return  # e.g. int64 images of 0..255
    finite = sample[np.isfinite(sample)] if dtype.kind == "f" else sample.astype(np.float64)
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if 0 <= low and high <= 1 and not integers:
        fix = f"save ({x_name} * 255).round().astype('uint8')"
    elif 0 <= low and high <= 255 and not integers:
        fix = f"save {x_name}.round().astype('uint8')"
    elif 0 <= low:
        fix = f"scale it, e.g. save ({x_name} * (255 / {x_name}.max())).round().astype('uint8')"
    else:
        fix = (f"shift and scale it, e.g. save (({x_name} - {x_name}.min()) * (255 / ({x_name}.max() - {x_name}.min()))"
               ").round().astype('uint8')")
    series = "; or, if x holds series, set data.modality=sequence" if guessed and len(shape) == 3 else ""
    missing = int(sample.size - finite.size)
    if missing:  # NaN or infinite values: no rounding makes pixels of them
        fix = f"replace them first (e.g. np.nan_to_num({x_name}, nan=0.0, posinf=0.0, neginf=0.0)), then {fix}"
    values = (f"values {low:g}..{high:g}" if finite.size else "no finite values") + \
        (f" and {missing:,} NaN or infinite" if missing else "")
    raise SourceError(f"{path}: image {x_name} is {dtype} with {values} in its first {rows} rows; "
                      f"images are read as uint8 0..255 (every row would be a dead letter): {fix}{series}")


def plan_npz(uri: str, path: str, data: DataConfig, labels: bool = True):
    """The plan of an .npz archive; without `labels` (batch prediction) y may be missing and is not
    read or checked, so the records' labels are empty."""
    check_path(uri, path, "file")
    arrays = _headers(path)
    parts = _parts(path, arrays, labels)
    first_shape, first_dtype, _ = arrays[next(iter(parts.values()))[0]]
    for split, (x_name, y_name) in parts.items():
        x_shape = arrays[x_name][0]
        if labels:
            y_shape = arrays[y_name][0]
            if len(y_shape) != 1 and y_shape[1:] != (1,):  # [N, 1] (keras.datasets' cifar10) is read as [N]
                one_hot = f" (for one-hot labels save {y_name}.argmax(axis=1))" if len(y_shape) == 2 else ""
                raise SourceError(f"{path}: {y_name} has shape {list(y_shape)}; expected one label per row, shape "
                                  f"[N] or [N, 1]{one_hot}")
            if x_shape[0] != y_shape[0]:
                raise SourceError(f"{path}: x{'_' + split if split else ''} has {x_shape[0]} rows but y has "
                                  f"{y_shape[0]}")
        if x_shape[1:] != first_shape[1:]:
            raise SourceError(f"{path}: x shapes differ between splits ({first_shape[1:]} and {x_shape[1:]})")
    if 0 in first_shape[1:]:  # nothing to learn from, and the statistics would divide by nothing
        raise SourceError(f"{path}: x has shape {list(first_shape)}, an empty dimension; each input needs at least "
                          "one value on every axis")
    modality = data.modality or ("sequence" if np.issubdtype(first_dtype, np.floating) else "image")
    ndim = len(first_shape)
    if modality == "image":
        if ndim not in (3, 4):
            hint = "; set data.modality=sequence for series" if ndim == 2 else ""
            raise SourceError(f"{path}: image x must be [N, H, W] or [N, H, W, C], got {list(first_shape)}{hint}")
        if ndim == 4 and first_shape[3] not in (1, 3):  # the export decodes image_bytes to 1 or 3 channels
            raise SourceError(f"{path}: image x has {first_shape[3]} channels ({list(first_shape)}); images have 1 "
                              "(grayscale) or 3 (RGB), as an image folder's are read: for RGBA keep x[..., :3]")
        for x_name, _ in parts.values():
            _check_image_values(path, x_name, arrays[x_name], guessed=not data.modality)
        spec = FeatureSpec("uint8", tuple(first_shape[1:]) + ((1,) if ndim == 3 else ()), "raw_bytes")
    elif modality == "sequence":
        if ndim not in (2, 3):
            hint = ("; for images [N, H, W, C], save x as uint8 0..255 (float x is read as sequences unless "
                    "data.modality=image)") if ndim == 4 and not data.modality else ""
            raise SourceError(f"{path}: sequence x must be [N, T] or [N, T, F], got {list(first_shape)}{hint}")
        spec = FeatureSpec("float32", tuple(first_shape[1:]) + ((1,) if ndim == 2 else ()), "float_list")
    else:
        raise SourceError(f"data.modality: npz sources hold images or sequences, not {modality}")
    row_bytes = max(1, int(np.prod(first_shape[1:], dtype=np.int64)) * first_dtype.itemsize)
    tasks, left = [], data.limit
    for split, (x_name, y_name) in parts.items():
        rows = arrays[x_name][0][0]
        if data.limit:
            rows = min(rows, left)
            left -= rows
        tasks += [("npz", split, x_name, y_name if labels else None, start, stop) for start, stop in
                  ranges(rows, max(1, TASK_BYTES // row_bytes))]
    read = [name for x_name, y_name in parts.values() for name in ((x_name, y_name) if labels else (x_name,))]
    options = {"path": path, "headers": {name: arrays[name] for name in read}}
    count = sum(task[5] - task[4] for task in tasks)
    return SourcePlan(uri, "npz", modality, modality, spec, (), None not in parts, tuple(tasks), count, options)


def read_npz_task(plan: SourcePlan, task):
    _, split, x_name, y_name, start, stop = task
    path, headers = plan.options["path"], plan.options["headers"]
    x = read_rows(path, x_name, headers[x_name], start, stop)
    prefix = split or "all"
    if y_name is None:  # no labels (batch prediction)
        for index, row in enumerate(x, start=start):
            yield SourceRecord(f"{prefix}/{index:07d}", row, "", split)
        return
    y = read_rows(path, y_name, headers[y_name], start, stop).reshape(stop - start)  # [N, 1] is read as [N]
    for index, (row, label) in enumerate(zip(x, y), start=start):
        key = f"{prefix}/{index:07d}"
        try:
            yield SourceRecord(key, row, label_text(label.item() if hasattr(label, "item") else label), split)
        except BadInput as error:
            yield SourceRecord(key, None, "", split, f"{y_name}[{index}]: {error}")


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
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise BadInput(f"sequence holds NaN or infinite values ({float(array[index])} at {list(index)}); fill missing "
                       "values, and pad shorter series with a number such as 0, not NaN")
    with np.errstate(over="ignore"):  # a finite float64 beyond float32's range becomes infinite: named below
        values = array.astype(np.float32)
    if not np.all(np.isfinite(values)):
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise BadInput(f"sequence value {float(array[index])!r} at {list(index)} is outside float32's range "
                       f"(±{float(np.finfo(np.float32).max):.7g})")
    return values
