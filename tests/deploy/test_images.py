"""The export's in-graph image decoding gives the pixels the pipeline's Pillow decoding gives."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deploy.images import decode_like_pipeline
from kcp.core.sources.images import decode_image_file

RNG = np.random.default_rng(0)


def picture(height: int, width: int, mode: str) -> Image.Image:
    """Noise (the hardest case for a resize) over a smooth pattern, in a Pillow mode."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 90 * np.sin(x / 3.0 + k) * np.cos(y / 5.0 - k) for k in range(4)], axis=-1)
    rgba = np.clip(base + RNG.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(rgba[..., 0], "L")
    if mode == "P":
        return Image.fromarray(rgba[..., :3], "RGB").quantize(64)
    return Image.fromarray(rgba if mode == "RGBA" else rgba[..., :3], mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def serve_decode(content: bytes, shape: tuple) -> np.ndarray:
    function = tf.function(lambda encoded: decode_like_pipeline(encoded, *shape))  # graph mode, as exported
    return function(tf.constant(content)).numpy()


CASES = [  # (format, Pillow mode of the file, file size (h, w), model input shape)
    ("PNG", "RGB", (64, 64), (32, 32, 3)),   # shrink by 2
    ("PNG", "RGB", (97, 203), (32, 24, 3)),  # shrink unevenly, non-square
    ("PNG", "RGB", (20, 18), (32, 40, 3)),   # enlarge
    ("PNG", "RGB", (32, 50), (32, 20, 3)),   # only the width changes
    ("PNG", "L", (64, 48), (16, 16, 1)),
    ("PNG", "RGB", (40, 40), (16, 16, 1)),   # colour file, gray model: Pillow's luma
    ("PNG", "L", (12, 12), (30, 30, 3)),     # gray file, colour model
    ("PNG", "RGBA", (50, 30), (20, 20, 3)),  # alpha dropped
    ("PNG", "P", (50, 30), (20, 20, 1)),     # palette
    ("JPEG", "RGB", (120, 90), (32, 32, 3)),
    ("JPEG", "RGB", (16, 16), (16, 16, 3)),  # same size: the decoder alone (accurate DCT)
    ("JPEG", "L", (16, 16), (16, 16, 1)),
    ("JPEG", "RGB", (50, 60), (24, 24, 1)),
    ("JPEG", "L", (10, 14), (28, 28, 3)),
    ("BMP", "L", (40, 40), (8, 8, 1)),       # decode_bmp takes no channels=1
    ("BMP", "RGB", (9, 7), (32, 32, 1)),
    ("GIF", "P", (40, 40), (8, 8, 1)),       # decode_gif takes no channels=1
    ("GIF", "L", (33, 17), (16, 16, 3)),
]


@pytest.mark.parametrize("fmt, mode, size, shape", CASES)
def test_served_file_decodes_to_the_pipelines_pixels(tmp_path, fmt, mode, size, shape):
    """Exactly Pillow's pixels (the old decoding, a non-antialiased resize and the fast JPEG DCT, was
    up to 115 levels apart, mean up to 25, when shrinking; up to 4 apart for JPEG at the same size)."""
    content = encode(picture(*size, mode), fmt)
    path = os.path.join(tmp_path, f"image.{fmt.lower()}")
    with open(path, "wb") as handle:
        handle.write(content)
    expected = decode_image_file(path, shape)
    served = serve_decode(content, shape)
    assert served.shape == shape and served.dtype == np.uint8
    np.testing.assert_array_equal(served, expected)
