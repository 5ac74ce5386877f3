"""Image sources: `digits` (scikit-learn's bundled 8x8 digits) and `folder:PATH` (image files
in class folders), and the decoding of one image file."""

from __future__ import annotations

import collections
import io
import os

import numpy as np

from kcp.core import storage
from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLITS
from kcp.core.sources.base import BadInput, SourceError, SourcePlan, SourceRecord, check_path, class_names_of

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
DIGITS_LEVELS = 16  # scikit-learn's digits hold integer intensities 0..16


# --- digits -------------------------------------------------------------------------------

def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """Rescales digits' 0..16 intensities to 0..255 uint8, [N, 8, 8] -> [N, 8, 8, 1]."""
    scaled = np.rint(np.asarray(images, dtype=np.float64) * (255.0 / DIGITS_LEVELS))
    return scaled.astype(np.uint8)[..., np.newaxis]


def plan_digits(uri: str):
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only this source needs it

    digits = load_digits()
    records = [SourceRecord(f"digits/{index:04d}", image, str(int(target)))
               for index, (image, target) in enumerate(zip(digits_to_uint8(digits.images), digits.target))]
    spec = FeatureSpec(dtype="uint8", shape=(8, 8, 1), encoding="raw_bytes")
    plan = SourcePlan(uri, "digits", "image", "image", spec, tuple(str(d) for d in range(10)), False)
    return plan, records


# --- folder -------------------------------------------------------------------------------

def _list_folder(root: str) -> list[tuple[str, str]]:
    """(path, path relative to root) of every image file one or two folders down."""
    root = root.rstrip("/")
    found = []
    if "://" in root:
        paths = set(storage.glob(f"{root}/*/*")) | set(storage.glob(f"{root}/*/*/*"))
        found = [(path, path[len(root) + 1:]) for path in paths if path[len(root) + 1:].count("/") in (1, 2)]
    else:
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                if relative.count("/") in (1, 2):
                    found.append((path, relative))
    return sorted((path, rel) for path, rel in found if rel.lower().endswith(IMAGE_EXTENSIONS))


def _image_header(path: str):
    """(height, width, has colour) from the file header, or None if it is not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path) as image:
            return image.height, image.width, image.mode not in GRAY_MODES
    except Exception:  # noqa: BLE001  an unreadable file is a dead letter later, not a planning error
        return None


def plan_folder(uri: str, root: str, data: DataConfig):
    check_path(uri, root)
    files = _list_folder(root)
    if not files:
        raise SourceError(f"data.source: {root} holds no {'/'.join(IMAGE_EXTENSIONS)} files in "
                          "PATH/<class>/ or PATH/<split>/<class>/")
    top = {relative.split("/")[0] for _, relative in files}
    has_splits = bool(top & set(SPLITS)) and all(relative.count("/") == 2 for _, relative in files
                                                 if relative.split("/")[0] in SPLITS)
    records = []
    for path, relative in files:
        parts = relative.split("/")
        if has_splits:
            if len(parts) != 3 or parts[0] not in SPLITS:
                continue  # files outside the split folders are not part of the data set
            records.append(SourceRecord(relative, path, parts[1], parts[0]))
        elif len(parts) == 2:
            records.append(SourceRecord(relative, path, parts[0], None))
    if not records:
        raise SourceError(f"data.source: {root} has no images in class folders")
    headers = [h for h in (_image_header(r.payload) for r in records) if h is not None]
    if not headers:
        raise SourceError(f"data.source: none of the {len(records)} files under {root} is a readable image")
    height, width = data.image_size or collections.Counter((h, w) for h, w, _ in headers).most_common(1)[0][0]
    channels = data.channels or (3 if any(colour for _, _, colour in headers) else 1)
    spec = FeatureSpec(dtype="uint8", shape=(int(height), int(width), int(channels)), encoding="raw_bytes")
    plan = SourcePlan(uri, "folder", "image", "image", spec, class_names_of(r.label for r in records), has_splits)
    return plan, records


def decode_image_file(path: str, shape: tuple) -> np.ndarray:
    """Reads and decodes one image file to uint8 [H, W, C] of `shape` (resized, converted)."""
    from PIL import Image, UnidentifiedImageError

    content = storage.read_bytes(path)
    if not content:
        raise BadInput("empty file")
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            image = image.convert("RGB" if shape[2] == 3 else "L")
            if image.size != (shape[1], shape[0]):
                image = image.resize((shape[1], shape[0]), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadInput(f"not a decodable image ({type(error).__name__}: {error})") from None
    return array.reshape(shape)
