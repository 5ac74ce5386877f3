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
    if mode == "1":
        return Image.fromarray(rgba[..., 0], "L").convert("1")  # dithered black and white
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
    ("BMP", "P", (30, 21), (16, 16, 3)),     # 8-bit palette: decode_bmp alone gives the indices as gray
    ("BMP", "P", (13, 40), (16, 16, 1)),
    ("BMP", "1", (25, 19), (16, 16, 3)),     # 1 bit per pixel: decode_bmp alone refuses it
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


def indexed_bmp(indices: np.ndarray, palette: np.ndarray, bits: int, top_down: bool = False,
                offset_to_palette: bool = False) -> bytes:
    """An uncompressed BMP of `bits` (1, 4 or 8) per pixel, written by hand (Pillow writes no 4-bit
    BMP): `indices` [H, W] into `palette` [N, 3] RGB (N: the header's colors-used). With
    `offset_to_palette` the header says the pixels start where the palette does (Pillow skips it)."""
    height, width = indices.shape
    row_bytes = (width * bits + 31) // 32 * 4
    rows = []
    for row in (indices if top_down else indices[::-1]):
        value = 0
        for index in row:
            value = (value << bits) | int(index)
        value <<= row_bytes * 8 - width * bits
        rows.append(value.to_bytes(row_bytes, "big"))
    table = b"".join(bytes([b, g, r, 0]) for r, g, b in palette)
    offset = 14 + 40 + len(table)
    info = np.array([40, width, -height if top_down else height], "<i4").tobytes() + np.array([1, bits], "<u2").tobytes() \
        + np.array([0, len(b"".join(rows)), 2835, 2835, len(palette), 0], "<u4").tobytes()
    pixels = b"".join(rows)
    said = 14 + 40 if offset_to_palette else offset
    return b"BM" + np.array([offset + len(pixels), 0, said], "<u4").tobytes() + info + table + pixels


@pytest.mark.parametrize("bits, top_down", [(4, False), (4, True), (8, True), (1, False)])
def test_an_indexed_bmp_is_served_its_palette_colours(tmp_path, bits, top_down):
    """decode_bmp returns a palette BMP's indices as gray levels; the export looks them up, as Pillow does."""
    palette = RNG.integers(0, 256, (1 << bits, 3))
    indices = RNG.integers(0, 1 << bits, (11, 13))
    content = indexed_bmp(indices, palette, bits, top_down)
    path = os.path.join(tmp_path, "image.bmp")
    with open(path, "wb") as handle:
        handle.write(content)
    for shape in ((11, 13, 3), (8, 8, 1)):
        expected = decode_image_file(path, shape)
        if shape == (11, 13, 3):
            np.testing.assert_array_equal(expected, palette[indices])  # the hand-made file is what it claims
        np.testing.assert_array_equal(serve_decode(content, shape), expected)


GRAY_16 = np.repeat(np.arange(16)[:, None], 3, axis=1)  # entry i is (i, i, i): Pillow reads mode "L"


@pytest.mark.parametrize("palette, offset_to_palette", [
    (RNG.integers(0, 256, (16, 3)), False),  # 16 colours, indices up to 255: those past the palette are black
    (GRAY_16, False),                        # a gray palette is no palette: the index is the gray level
    (RNG.integers(0, 256, (256, 3)), True),  # pixel data said to start where the palette does
])
def test_an_indexed_bmp_is_read_as_pillow_reads_its_header(tmp_path, palette, offset_to_palette):
    indices = RNG.integers(0, 256, (9, 10))
    content = indexed_bmp(indices, palette, 8, offset_to_palette=offset_to_palette)
    path = os.path.join(tmp_path, "image.bmp")
    with open(path, "wb") as handle:
        handle.write(content)
    for shape in ((9, 10, 3), (9, 10, 1)):
        np.testing.assert_array_equal(serve_decode(content, shape), decode_image_file(path, shape))


@pytest.mark.parametrize("damage, message", [
    (lambda content: content[:-5], r"instance 0: a truncated BMP \(\d+ bytes, its palette and 4 rows of 4 bytes"),
    (lambda content: content[:60], "instance 0: a truncated BMP"),
    (lambda content: content[:30] + (1).to_bytes(4, "little") + content[34:],  # BI_RLE8
     "instance 0: a BMP of 8 bits per pixel, compression 1, header size 40: not supported by serving_default"),
])
def test_a_bmp_the_export_cannot_read_is_refused_in_one_line(damage, message):
    content = damage(indexed_bmp(np.zeros((4, 4), int), RNG.integers(0, 256, (256, 3)), 8))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serve_decode(content, (4, 4, 3))


@pytest.mark.parametrize("mode, size, shape, frames", [
    ("P", (20, 24), (20, 24, 3), 1), ("P", (40, 30), (16, 16, 3), 1), ("P", (40, 30), (16, 16, 1), 1),
    ("P", (20, 24), (20, 24, 3), 2),
    ("L", (20, 24), (20, 24, 1), 1), ("L", (20, 24), (20, 24, 3), 1)])  # a palette of grays: Pillow opens it as L
def test_a_transparent_gif_is_served_the_pixels_it_was_trained_on(tmp_path, mode, size, shape, frames):
    """TensorFlow's GIF decoder gives a transparent pixel black, Pillow its palette colour: the pipeline
    takes TensorFlow's, so a served icon with a transparent background is the one trained on."""
    first = picture(*size, mode)
    transparent = int(np.asarray(first)[0, 0])  # the colour of the top-left pixel, wherever it recurs
    assert (np.asarray(first) == transparent).sum() > 1
    buffer = io.BytesIO()
    first.save(buffer, "GIF", transparency=transparent, save_all=frames > 1, optimize=False,
               append_images=[picture(*size, "P")] if frames > 1 else [])
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert opened.mode == mode and opened.info["transparency"] == transparent
    path = os.path.join(tmp_path, "icon.gif")
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    expected = decode_image_file(path, shape)
    np.testing.assert_array_equal(serve_decode(buffer.getvalue(), shape), expected)
    if shape[:2] == size:
        assert not expected[np.asarray(first) == transparent].any()  # black, not the palette colour
