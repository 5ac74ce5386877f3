"""Offline augmentation: pure NumPy functions, deterministic per (example key, copy index).

The pipeline writes each train example plus `data.augment.copies` augmented copies, keyed
`KEY#augN`. Every random draw comes from a generator seeded by the key and the copy index,
so reruns produce the same copies on any runner and worker count.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from kcp.core.config import OfflineAugmentConfig


def rng_for(key: str, copy: int) -> np.random.Generator:
    digest = hashlib.sha256(f"augment:{key}:{copy}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def augment_image(image: np.ndarray, config: OfflineAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [H, W, C]: crop with padding, flip, rotation, brightness/contrast, cutout."""
    height, width, channels = image.shape
    x = image
    if config.crop_padding:
        pad_y, pad_x = int(round(height * config.crop_padding)), int(round(width * config.crop_padding))
        padded = np.pad(x, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="constant")
        top, left = rng.integers(0, 2 * pad_y + 1), rng.integers(0, 2 * pad_x + 1)
        x = padded[top:top + height, left:left + width]
    if config.flip and rng.random() < 0.5:
        x = x[:, ::-1]
    if config.rotation:
        angle = float(rng.uniform(-config.rotation, config.rotation))
        planes = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).rotate(angle, resample=Image.BILINEAR))
                  for c in range(channels)]
        x = np.stack(planes, axis=-1)
    values = x.astype(np.float32)
    if config.contrast:
        factor = 1.0 + rng.uniform(-config.contrast, config.contrast)
        mean = values.mean(axis=(0, 1), keepdims=True)
        values = (values - mean) * factor + mean
    if config.brightness:
        values = values + rng.uniform(-config.brightness, config.brightness) * 255.0
    if config.cutout:
        size_y, size_x = max(1, int(round(height * config.cutout))), max(1, int(round(width * config.cutout)))
        top, left = rng.integers(0, height - size_y + 1), rng.integers(0, width - size_x + 1)
        values[top:top + size_y, left:left + size_x] = 0.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def augment_sequence(sequence: np.ndarray, config: OfflineAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """float32 [T, F] -> [T, F]: circular time shift, amplitude scaling about each feature's mean,
    noise scaled to each feature's std."""
    x = np.asarray(sequence, dtype=np.float32)
    steps = x.shape[0]
    if config.time_shift:
        limit = int(round(steps * config.time_shift))
        x = np.roll(x, int(rng.integers(-limit, limit + 1)), axis=0)
    if config.scale:  # the amplitude around each feature's mean: an offset (a constant, kelvins) is kept
        mean = x.mean(axis=0, keepdims=True)
        x = mean + (x - mean) * np.float32(1.0 + rng.uniform(-config.scale, config.scale))
    if config.noise:
        std = x.std(axis=0, keepdims=True)
        x = x + (rng.normal(size=x.shape) * config.noise * std).astype(np.float32)
    return x.astype(np.float32)


def augment_text(text: str, config: OfflineAugmentConfig, rng: np.random.Generator) -> str:
    """Deletes each word with probability `token_delete` (keeping one), then swaps adjacent pairs."""
    words = text.split()
    if config.token_delete and len(words) > 1:
        kept = [word for word in words if rng.random() >= config.token_delete]
        words = kept or [words[int(rng.integers(0, len(words)))]]
    if config.token_swap and len(words) > 1:
        for _ in range(max(1, int(round(len(words) * config.token_swap)))):
            index = int(rng.integers(0, len(words) - 1))
            words[index], words[index + 1] = words[index + 1], words[index]
    return " ".join(words)


AUGMENTERS = {"image": augment_image, "sequence": augment_sequence, "text": augment_text}


def augmented_copies(key: str, inputs, modality: str, config: OfflineAugmentConfig):
    """[(KEY#aug1, inputs1), …] for `config.copies` copies."""
    augment = AUGMENTERS[modality]
    return [(f"{key}#aug{copy}", augment(inputs, config, rng_for(key, copy))) for copy in range(1, config.copies + 1)]
