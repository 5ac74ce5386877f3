"""Sources of raw examples, chosen by `data.source` (`kcp preprocess --source URI`).

A source tells, before the pipeline starts, the modality, the decoded input spec and
whether it brings its own splits; inside the pipeline it yields `RawExample`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from kcp.errors import UserError
from pipeline.contract import FeatureSpec


class SourceError(UserError, ValueError):
    """A source URI that cannot be read; raised before the pipeline starts."""


@dataclass(frozen=True)
class RawExample:
    key: str  # stable across reruns: the split and the shard are derived from it
    inputs: np.ndarray
    label: str  # class name
    split: Optional[str] = None  # set when the source brings its own splits


@dataclass(frozen=True)
class SourcePlan:
    """What the driver knows about a source before the pipeline runs."""

    uri: str
    modality: str
    input_feature: str
    input_spec: FeatureSpec
    class_names: tuple
    has_splits: bool


DIGITS_LEVELS = 16  # scikit-learn's digits hold integer intensities 0..16


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """Rescales digits' 0..16 intensities to 0..255 uint8, [N, 8, 8] -> [N, 8, 8, 1]."""
    scaled = np.rint(np.asarray(images, dtype=np.float64) * (255.0 / DIGITS_LEVELS))
    return scaled.astype(np.uint8)[..., np.newaxis]


def read_digits() -> list[RawExample]:
    """scikit-learn's bundled digits: 1,797 8x8 grayscale images of 10 classes, read offline."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits_to_uint8(digits.images)
    return [
        RawExample(key=f"digits/{index:04d}", inputs=image, label=str(int(target)))
        for index, (image, target) in enumerate(zip(images, digits.target))
    ]


def plan_source(uri: str) -> SourcePlan:
    """Resolves a source URI to its plan, failing with a one-line reason if it cannot be read."""
    kind = uri.split(":", 1)[0]
    if kind == "digits":
        return SourcePlan(
            uri=uri,
            modality="image",
            input_feature="image",
            input_spec=FeatureSpec(dtype="uint8", shape=(8, 8, 1), encoding="raw_bytes"),
            class_names=tuple(str(d) for d in range(10)),
            has_splits=False,
        )
    raise SourceError(f"data.source: {uri!r} is not a known source; allowed: digits")


def read_source(plan: SourcePlan, limit: int = 0) -> list[RawExample]:
    """The examples of an in-memory source (small, bundled data sets); the first `limit` if set."""
    if plan.uri.split(":", 1)[0] == "digits":
        examples = read_digits()
        return examples[:limit] if limit else examples
    raise SourceError(f"data.source: {plan.uri!r} cannot be read in memory")
