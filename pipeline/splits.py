"""Reproducible train/validation/test assignment from an example's key: pure, no Beam, no TF."""

from __future__ import annotations

import hashlib

from kcp.core.layout import SPLITS


def stable_fraction(text: str, seed) -> float:
    """A number in [0, 1) that depends only on `text` and `seed`: same on every run and worker."""
    digest = hashlib.sha256(f"{seed}:{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def stable_split(key: str, fractions, seed) -> str:
    """Assigns an example key to train/validation/test with the given fractions."""
    position = stable_fraction(key, seed)
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if position < cumulative:
            return split
    return SPLITS[-1]  # rounding: fractions that sum to 1 - epsilon
