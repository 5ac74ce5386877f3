"""What every source kind shares: the record types, the plan, the two errors and small helpers."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from kcp.core import storage
from kcp.core.contract import FeatureSpec
from kcp.core.errors import UserError


class SourceError(UserError, ValueError):
    """A source that cannot be read; raised before the pipeline starts (or by a reader)."""


class BadInput(ValueError):
    """One input that cannot be used; it goes to the dead letters with this message."""


@dataclass(frozen=True)
class SourceRecord:
    key: str  # stable across reruns: the split and the shard are derived from it
    payload: Any  # a file path (folder), an array (digits, npz, tfds images) or a string (text)
    label: str
    split: Optional[str] = None  # set when the source brings its own splits
    problem: Optional[str] = None  # set by a reader for an input it could not parse: a dead letter
    where: Optional[str] = None  # a table's row and line ("row 3 (line 4)"), named by its dead letters


@dataclass(frozen=True)
class RawExample:
    key: str
    inputs: Any  # np.ndarray of the plan's dtype and shape, or a str for text
    label: str  # class name
    split: Optional[str] = None


@dataclass(frozen=True)
class SourcePlan:
    """What the driver knows about a source before the pipeline runs: small, whatever the data.

    `tasks` are the read tasks the workers execute (`read_task`): class folders, whole table
    files, row ranges of an archive or a TFDS split; never the rows themselves. `class_names`
    is empty and `has_splits` None when only a pass over the rows can tell (tables, npz):
    the pipeline then computes them with a combiner. `estimated_count` is the number of
    inputs when the listing or the headers give it, else an estimate from the file size.
    """

    uri: str
    kind: str
    modality: str
    input_feature: str
    input_spec: FeatureSpec
    class_names: tuple
    has_splits: Optional[bool]
    tasks: tuple = ()
    estimated_count: int = 0
    options: dict = field(default_factory=dict)  # per kind: paths, columns, builder name, limit


def class_names_of(labels) -> tuple:
    """Sorted class names; numerically when every label is an integer (ASCII or Unicode decimal
    digits: "²" is a digit but no decimal, so `1, 2, ²` sorts as text). Names of equal value
    (`01` and `1`) are ordered as text, so the order never depends on a set's (hash-seeded) order."""
    names = {str(label) for label in labels}
    try:
        if all(name.lstrip("-").isdecimal() for name in names):
            return tuple(sorted(names, key=lambda name: (int(name), name)))
    except ValueError:
        pass
    return tuple(sorted(names))


# pandas' default `na_values` (pandas._libs.parsers.STR_NA_VALUES, pandas 2.x), as pandas compares
# them, case and all (`NA` and `None` are missing; `na`, `none` and `NONE` are classes): a CSV label
# cell holding one of them is a missing label, as an empty cell is
MISSING_MARKERS = frozenset(("#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                             "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"))
_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][+-]?\d+)?")  # not a plain integer


def label_text(value, cell: bool = False) -> str:
    """The class name of a raw label (a table cell, a JSON value, an array item); "" when missing.

    Strings lose surrounding whitespace (`"pos "` is `pos`, `" "` is missing); bytes are decoded
    as UTF-8; a float with an integral value is named as the integer (`1.0` is `1`). Raises
    BadInput for what cannot be a class: a list or an object, NaN, bytes that are not UTF-8,
    a line break (class names are written one a line in labels.txt).

    A table `cell` (CSV text) is read as pandas reads a column: a missing-value marker
    (MISSING_MARKERS, as pandas writes them: `NA`, `nan`, `None`, ..., not `none`) is missing, and a whole number written as
    a float (`1.0`, `2.`, `1e3`) is named as the integer (`1`, `2`, `1000`), as a JSON number is;
    other text is kept as written: integers (`007`) and other decimals (`0.50`, and `3.10`, which
    a version-like label would be wrong to merge with `3.1`).
    """
    if value is None:
        return ""
    if cell and isinstance(value, str):
        stripped = value.strip()
        if stripped in MISSING_MARKERS:
            return ""
        if _FLOAT_TEXT.fullmatch(stripped):
            number = float(stripped)
            if math.isfinite(number) and number.is_integer():  # `3.10` and `3.1` stay two classes
                value = number
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"label {value!r} is not UTF-8 text") from None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise BadInput(f"label {value} is not a finite number")
        return str(int(value)) if float(value).is_integer() else str(float(value))
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise BadInput(f"label {shown} is a {type(value).__name__}, not a string or a number")
    label = value.strip()
    if "\n" in label:
        raise BadInput(f"label {label!r} contains a line break; class names are written one a line in labels.txt")
    return label


def has_surrogates(text: str) -> bool:
    """Whether `text` holds surrogate escapes (bytes that were not UTF-8), so it cannot be encoded."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def safe_key(relative: str) -> str:
    """The key of a file: its path relative to the root, as valid UTF-8 (a name that is not
    UTF-8 keeps its bytes as \\xNN escapes, so hashing and encoding the key never fail)."""
    if not has_surrogates(relative):
        return relative
    return os.fsencode(relative).decode("utf-8", errors="backslashreplace")


def check_path(uri: str, path: str, kind: str | None = None, labels: bool = True) -> None:
    """Fails with one line when the source names no path, a path that does not exist, or (a local
    path, with `kind` "file" or "folder") a folder where the source reads a file or the reverse
    (`labels` false: batch prediction, whose folder may hold the images themselves)."""
    if not path:
        raise SourceError(f"data.source: {uri!r} names no path")
    if not storage.exists(path):
        raise SourceError(f"data.source: {path} does not exist")
    scheme = uri.split(":", 1)[0]
    if kind == "file" and not storage.is_remote(path) and os.path.isdir(path):
        raise SourceError(f"data.source: {path} is a folder; {scheme}: reads one file "
                          f"(name it: {scheme}:{path.rstrip('/')}/FILE)")
    if kind == "folder" and not storage.is_remote(path) and os.path.isfile(path):
        what = "class folders" if labels else "images (or of folders of them)"
        raise SourceError(f"data.source: {path} is a file; {scheme}: reads a folder of {what} "
                          "(name the folder that holds them)")


def open_binary(path: str):
    """A seekable binary reader for a local or remote file (Beam's filesystems, as on the workers)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def ranges(total: int, step: int, limit: int = 0):
    """[start, stop) ranges of `step` rows covering `total` (the first `limit` when limit > 0)."""
    total = min(total, limit) if limit else total
    return [(start, min(start + step, total)) for start in range(0, total, max(1, step))]


def read_input_file(path: str) -> bytes:
    """The bytes of one input file (an image, a document); BadInput, one dead letter, when it
    cannot be read: a broken symbolic link, a file removed or made unreadable since the listing."""
    try:
        return storage.read_bytes(path)
    except Exception as error:  # noqa: BLE001  storage's and Beam's errors differ per backend
        if not storage.is_remote(path) and os.path.islink(path) and not os.path.exists(path):
            raise BadInput(f"a broken symbolic link (to {os.readlink(path)}, which does not exist)") from None
        raise BadInput(f"cannot read the file ({type(error).__name__}: {error})") from None


def field_paths(row: dict, prefix: str = "") -> list[str]:
    """The names a JSON object's fields can be given by: each key, and `key.inner` for the fields of
    an object inside it (`{"ticket": {"body": …}}` has `ticket` and `ticket.body`)."""
    paths = []
    for key, value in row.items():
        paths.append(prefix + key)
        if isinstance(value, dict):
            paths += field_paths(value, f"{prefix}{key}.")
    return paths


def field(row: dict, name: str):
    """The value of the field `name` of a JSON object: a key as it is (dots and all), else a path
    `outer.inner` into the objects inside it; None when there is none."""
    if name in row:
        return row[name]
    outer, dot, inner = name.partition(".")
    while dot:
        if isinstance(row.get(outer), dict):
            found = field(row[outer], inner)
            if found is not None:
                return found
        more, dot, inner = inner.partition(".")
        outer = f"{outer}.{more}"
    return None
