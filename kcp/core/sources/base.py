"""What every source kind shares: the record types, the two errors and small helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kcp.core import storage
from kcp.core.contract import FeatureSpec
from kcp.core.errors import UserError


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


def class_names_of(labels) -> tuple:
    """Sorted class names; numerically when every label is an integer."""
    names = {str(label) for label in labels}
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def check_path(uri: str, path: str) -> None:
    """Fails with one line when the source names no path or a path that does not exist."""
    if not path:
        raise SourceError(f"data.source: {uri!r} names no path")
    if not storage.exists(path):
        raise SourceError(f"data.source: {path} does not exist")
