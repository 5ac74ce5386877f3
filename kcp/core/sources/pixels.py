"""Decoding one image file to the pixels the model trains on, exactly as the export's in-graph
decoder (deploy/images.py) gives them: 16-bit grayscale as its high bytes, a GIF's transparent
pixels black, Pillow's resize; and the check batch prediction makes before sending a file."""

from __future__ import annotations

import io
import re

import numpy as np

from kcp.core.sources.base import BadInput, read_input_file

SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens a 16-bit grayscale PNG ("I" in older Pillow)


def to_8_bit(image):
    """A 16-bit grayscale image as 8-bit "L", keeping each value's high byte (v >> 8), exactly as
    TensorFlow's PNG decoder (`tf.io.decode_png`/`decode_image` with dtype uint8, the export's
    in-graph decode) does. Pillow's own `convert("L")` clips instead (1000 -> 255, not 3), so
    training data and served inputs would disagree. Other images are returned unchanged (Pillow
    already reads 16-bit colour PNGs as the high bytes, as TensorFlow does)."""
    from PIL import Image

    if image.mode not in SIXTEEN_BIT_GRAY:
        return image
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8), "L")


def transparent_as_tensorflow(image):
    """A GIF's transparent pixels black (0, 0, 0), as TensorFlow's GIF decoder (the export's
    in-graph decode) gives them; Pillow gives them their palette colour, so a served GIF would
    not get the pixels it was trained on. Other images are returned unchanged (TensorFlow's PNG
    decoder keeps a transparent pixel's colour, as Pillow does)."""
    from PIL import Image

    if image.format != "GIF":
        return image
    transparent = image.info.get("transparency")
    if image.mode in ("P", "L") and isinstance(transparent, int):  # L: Pillow's mode for a palette of grays
        hidden = np.asarray(image) == transparent
    elif image.mode in ("RGBA", "LA", "PA"):
        hidden = np.asarray(image.getchannel("A")) == 0
    else:
        return image
    if not hidden.any():
        return image
    pixels = np.array(image.convert("RGB"))
    pixels[hidden] = 0
    return Image.fromarray(pixels, "RGB")


def decode_image_file(path: str, shape: tuple) -> np.ndarray:
    """Reads and decodes one image file to uint8 [H, W, C] of `shape` (resized, converted).

    Every failure of the decoder (a truncated file, a decompression bomb, an error inside a
    plugin) is a BadInput, so one file never fails the job.
    """
    from PIL import Image

    content = read_input_file(path)  # a file that vanished or cannot be read is one dead letter
    if not content:
        raise BadInput("empty file")
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            if image.mode == "F":  # Pillow's convert would clip 0.0..1.0 to 0..1: an all-black image
                low, high = image.getextrema()
                raise BadInput(f"a 32-bit floating-point image (values {low:g}..{high:g}); images are read as "
                               "0..255 pixels: save it as 8 bits (for values of 0..1, x * 255)")
            image = transparent_as_tensorflow(to_8_bit(image)).convert("RGB" if shape[2] == 3 else "L")
            if image.size != (shape[1], shape[0]):
                image = image.resize((shape[1], shape[0]), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except BadInput:
        raise
    except Exception as error:  # noqa: BLE001  DecompressionBombError, OSError, SyntaxError, plugin errors
        raise BadInput(undecodable(error)) from None
    return array.reshape(shape)


def undecodable(error: Exception) -> str:
    """A dead letter's reason for an image Pillow could not decode, without the `<_io.BytesIO object
    at 0x...>` that Pillow names its in-memory file by (it differs from run to run and says nothing)."""
    message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error))
    return f"not a decodable image ({type(error).__name__}: {message})"


def check_image_bytes(content: bytes) -> None:
    """Raises BadInput unless `content` is an image Pillow can decode (batch prediction's check
    before the model's own in-graph decoder sees it)."""
    from PIL import Image

    if not content:
        raise BadInput("empty file")
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
    except Exception as error:  # noqa: BLE001
        raise BadInput(undecodable(error)) from None
