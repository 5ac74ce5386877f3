"""Image sources: `digits` (scikit-learn's bundled 8x8 digits) and `folder:PATH` (image files
in class folders); pixels.py decodes one image file.

The driver lists the folder (file names only), takes the classes and whether the source has
split folders from the folder names, and reads the headers of at most HEADER_SAMPLE files (taken
from the class folders in turn) for the size and channels. The read tasks are the class folders: each
worker lists its folder, subfolders included, and outputs one record (key, path) per image;
the files are read and decoded later, on the workers. Nothing is left out unsaid: an image
outside the class folders or an empty class folder is a one-line error, and files that are
not images by their extension are counted in the plan (`options["skipped"]`).

Without labels (batch prediction) the folders name no classes: every image below PATH is read,
subfolders included, whatever they are named (a flat folder of images, or a labelled layout
whose class and split folders are then just folders). The keys are the paths relative to PATH,
as with labels; the read tasks are the images directly in PATH and each top folder.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
from typing import NamedTuple

import numpy as np

from kcp.core import storage
from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLIT_NAMES
from kcp.core.sources.base import (SourceError, SourcePlan, SourceRecord, check_path, class_names_of,
                                   has_surrogates, ranges, safe_key)
from kcp.core.sources.pixels import (SIXTEEN_BIT_GRAY, check_image_bytes, decode_image_file,  # noqa: F401
                                     to_8_bit, transparent_as_tensorflow, undecodable)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what Pillow reads
# what Pillow reads here but the export's image_bytes input (tf.io.decode_image: PNG, JPEG, GIF, BMP) does not
UNSERVED_EXTENSIONS = (".webp", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
DIGITS_LEVELS = 16  # scikit-learn's digits hold integer intensities 0..16
DIGITS_COUNT = 1797
DIGITS_TASK_ROWS = 600
HEADER_SAMPLE = 256  # files whose headers fix a folder's image size and channels
# data.image_size null: the most common size, scaled down to this many pixels on its longer side
# (Ludwig's infer_image_max_height/width; Keras' image_dataset_from_directory takes 256x256)
DEFAULT_MAX_SIDE = 256


# --- digits -------------------------------------------------------------------------------

def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """Rescales digits' 0..16 intensities to 0..255 uint8, [N, 8, 8] -> [N, 8, 8, 1]."""
    scaled = np.rint(np.asarray(images, dtype=np.float64) * (255.0 / DIGITS_LEVELS))
    return scaled.astype(np.uint8)[..., np.newaxis]


def plan_digits(uri: str, data: DataConfig):
    spec = FeatureSpec(dtype="uint8", shape=(8, 8, 1), encoding="raw_bytes")
    tasks = tuple(("digits", start, stop) for start, stop in ranges(DIGITS_COUNT, DIGITS_TASK_ROWS, data.limit))
    return SourcePlan(uri, "digits", "image", "image", spec, tuple(str(d) for d in range(10)), False, tasks,
                      min(DIGITS_COUNT, data.limit or DIGITS_COUNT))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64 of 0..16, targets [1797] int64), the arrays of
    `sklearn.datasets.load_digits()`, read from the file scikit-learn ships without importing
    scikit-learn (3 s of the 8 s a digits `kcp preprocess` may take)."""
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise SourceError("data.source: digits needs scikit-learn, which ships the data set: pip install scikit-learn")
    data = np.loadtxt(os.path.join(package.submodule_search_locations[0], "datasets", "data", "digits.csv.gz"),
                      delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def read_digits(start: int, stop: int):
    images, targets = load_digits_arrays()
    for index, (image, target) in enumerate(zip(digits_to_uint8(images[start:stop]), targets[start:stop]),
                                            start=start):
        yield SourceRecord(f"digits/{index:04d}", image, str(int(target)))


# --- folder -------------------------------------------------------------------------------

def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _files_below(directory: str) -> list[str]:
    """Every file below `directory` (recursively), relative to it, sorted; hidden paths (a part
    starting with ".", such as .ipynb_checkpoints/ or .DS_Store) left out."""
    try:
        names = storage.list_files(directory.rstrip("/"))
    except OSError:
        return []
    return [name for name in names if not _hidden(name)]


def _subfolders(directory: str) -> list[str]:
    """The folders directly in `directory` (local: empty ones too), hidden ones left out, sorted."""
    directory = directory.rstrip("/")
    if storage.is_remote(directory):
        return sorted({name.split("/")[0] for name in _files_below(directory) if "/" in name})
    try:
        return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not _hidden(entry.name))
    except OSError:
        return []


def _checked_name(root: str, name: str) -> str:
    """A class folder's name as a class name: refused when it is not UTF-8 or holds a line break."""
    if has_surrogates(name):
        raise SourceError(f"data.source: class folder {os.fsencode(name)!r} in {root} is not a UTF-8 name; "
                          "rename it")
    if "\n" in name:
        raise SourceError(f"data.source: class folder {name!r} in {root} holds a line break; rename it")
    return name


def _class_folders(root: str) -> tuple[bool, list[tuple[str, str, str | None]]]:
    """(has split folders, [(class folder, class, split)]), from folder names only.

    A top folder named train, validation (val, valid) or test that holds folders is a split
    folder, and then every top folder must be one; otherwise the top folders are the classes
    (a folder `test` holding only images is a class named test). A file never decides the layout.
    """
    top = _subfolders(root)
    split_tops = [name for name in top if name.lower() in SPLIT_NAMES and _subfolders(f"{root}/{name}")]
    if not split_tops:
        return False, [(f"{root}/{name}", _checked_name(root, name), None) for name in top]
    others = [name for name in top if name not in split_tops]
    if others:
        raise SourceError(f"data.source: {root} holds split folders ({', '.join(split_tops)}) and other folders "
                          f"({', '.join(map(repr, others))}); put every class folder in a split folder, "
                          f"{root}/<split>/<class>/, or use no split folders")
    seen = {}
    for name in split_tops:
        split = SPLIT_NAMES[name.lower()]
        if split in seen:
            raise SourceError(f"data.source: {root}/{seen[split]} and {root}/{name} are both the {split} split; "
                              "merge them")
        seen[split] = name
    return True, [(f"{root}/{name}/{label}", _checked_name(f"{root}/{name}", label), SPLIT_NAMES[name.lower()])
                  for name in split_tops for label in _subfolders(f"{root}/{name}")]


def _loose_files(directory: str) -> list[str]:
    """The names of the files directly in `directory` (hidden ones left out), sorted; a broken link
    is one (os.walk lists it below, and reading it makes a dead letter), a link to a folder is not."""
    if storage.is_remote(directory):
        return [name for name in _files_below(directory) if "/" not in name]
    try:
        return sorted(entry.name for entry in os.scandir(directory)
                      if (entry.is_file() or entry.is_symlink() and not entry.is_dir()) and not _hidden(entry.name))
    except OSError:
        return []


def _listing(root: str, has_splits: bool, folders) -> tuple[list, list[str]]:
    """([(class folder, class, split, image paths)], files skipped as not images by extension,
    relative to the root). A class folder's images are every image below it, its subfolders
    (or links to folders) included; an image outside the class folders, or a class folder
    without an image, is a one-line error naming it."""
    loose = _loose_files(root)
    for split_folder in sorted({folder.rsplit("/", 1)[0] for folder, _, _ in folders} - {root}):
        loose += [f"{split_folder[len(root) + 1:]}/{name}" for name in _loose_files(split_folder)]
    outside = [name for name in loose if _is_image(name)]
    broken = [name for name in outside if not os.path.exists(f"{root}/{name}")] if not storage.is_remote(root) else []
    if broken:
        raise SourceError(f"data.source: {root}/{broken[0]} is a broken link outside the class folders; remove it")
    if outside:
        where = f"{root}/<split>/<class>/" if has_splits else f"{root}/<class>/"
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise SourceError(f"data.source: {root}/{outside[0]}{more} is not in a class folder ({where}); move it into "
                          "one or remove it")
    listing, skipped = [], [name for name in loose if not _is_image(name)]
    for folder, label, split in folders:
        names = _files_below(folder)
        images = [f"{folder}/{name}" for name in names if _is_image(name)]
        if not images:
            texts = any(name.lower().endswith((".txt", ".md", ".text")) for name in names)
            hint = ("; folder: reads images: for text, make a csv: or jsonl: table of a text and a label column "
                    "(docs/data.md)") if texts else ""
            raise SourceError(f"data.source: class folder {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} files; "
                              f"add images or remove it{hint}")
        listing.append((folder, label, split, images))
        skipped += [f"{folder[len(root) + 1:]}/{name}" for name in names if not _is_image(name)]
    return listing, sorted(skipped)


def _unlabelled_listing(root: str) -> tuple[list, list[str]]:
    """([(folder, "", None, image paths)], files skipped as not images), for reading without labels:
    the images directly in the root (folder: the root itself), then every image below each top
    folder (its subfolders included), as a class folder's are read; folders without images are
    left out. A one-line error when there is no image at all."""
    loose = _loose_files(root)
    listing = [(root, "", None, [f"{root}/{name}" for name in loose if _is_image(name)])]
    skipped = [name for name in loose if not _is_image(name)]
    for name in _subfolders(root):
        folder = f"{root}/{name}"
        below = _files_below(folder)
        listing.append((folder, "", None, [f"{folder}/{file}" for file in below if _is_image(file)]))
        skipped += [f"{name}/{file}" for file in below if not _is_image(file)]
    listing = [entry for entry in listing if entry[3]]
    if not listing:
        raise SourceError(f"data.source: {root} holds no {'/'.join(IMAGE_EXTENSIONS)} files, in it or below it")
    return listing, sorted(skipped)


def read_loose_images(root: str):
    """The records of the images directly in `root` (reading without labels; key: the file name)."""
    for name in _loose_files(root):
        if _is_image(name):
            yield SourceRecord(safe_key(name), f"{root}/{name}", "")


def read_class_folder(root: str, folder: str, label: str, split):
    """The records of one class folder, its subfolders included (key: the path relative to the root)."""
    for name in _files_below(folder):
        if _is_image(name):
            path = f"{folder.rstrip('/')}/{name}"
            yield SourceRecord(safe_key(path[len(root) + 1:]), path, label, split)


EXIF_ORIENTATION = 0x0112  # 1: as stored; 2-8: mirrored and/or turned (a phone held sideways)


class ImageHeader(NamedTuple):
    """What planning reads of one sampled file."""
    height: int
    width: int
    colour: bool
    largest: int | None  # the largest value of a 16-bit gray image
    turned: bool  # its EXIF says to turn or mirror it


def _image_header(path: str) -> ImageHeader | None:
    """The file's header (and the pixels of a 16-bit gray image), or None if it is not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path) as image:
            largest = int(np.asarray(image).max()) if image.mode in SIXTEEN_BIT_GRAY else None
            turned = image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)
            return ImageHeader(image.height, image.width, image.mode not in GRAY_MODES, largest, turned)
    except Exception:  # noqa: BLE001  an unreadable file is a dead letter later, not a planning error
        return None


def header_sample(folders: list[list[str]]) -> list[str]:
    """At most HEADER_SAMPLE files, taken from the folders in turn (the first file of each, then the
    second, ...), not the first files of the listing: those are one class, whose images may all be
    gray or of another size. Every folder is sampled when there are at most HEADER_SAMPLE."""
    sample: list[str] = []
    for depth in range(max(map(len, folders), default=0)):
        sample.extend(files[depth] for files in folders if depth < len(files))
        if len(sample) >= HEADER_SAMPLE:
            break
    return sample[:HEADER_SAMPLE]


def plan_folder(uri: str, root: str, data: DataConfig, labels: bool = True):
    """The plan of an image folder; without `labels` (batch prediction) every image below the root
    is read, whatever the folders are named, and the records' labels are empty."""
    check_path(uri, root, "folder", labels)
    root = root.rstrip("/")
    if labels:
        has_splits, folders = _class_folders(root)
        if not folders:
            raise SourceError(f"data.source: {root} holds no {'/'.join(IMAGE_EXTENSIONS)} files in "
                              "PATH/<class>/ or PATH/<split>/<class>/")
        listing, skipped = _listing(root, has_splits, folders)
    else:
        has_splits, (listing, skipped) = False, _unlabelled_listing(root)
    count = sum(len(files) for *_, files in listing)
    sample = header_sample([sorted(files) for *_, files in listing])
    if data.image_size and data.channels:  # no header is read (on gs://, 256 reads spared)
        headers = [ImageHeader(0, 0, False, None, False)]
    else:
        headers = [h for h in (_image_header(path) for path in sample) if h is not None]
    if not headers:
        raise SourceError(f"data.source: none of the {len(sample)} files sampled under {root} is a readable image")
    sizes = collections.Counter((header.height, header.width) for header in headers)
    (height, width), share = data.image_size or sizes.most_common(1)[0][0], sizes.most_common(1)[0][1]
    capped = None
    if not data.image_size and max(height, width) > DEFAULT_MAX_SIDE:  # photos: 4032x3024 would not fit a batch
        capped, factor = (height, width), DEFAULT_MAX_SIDE / max(height, width)
        height, width = max(1, round(height * factor)), max(1, round(width * factor))
    channels = data.channels or (3 if any(header.colour for header in headers) else 1)
    sixteen_bit = [header.largest for header in headers if header.largest is not None]
    turned = sum(header.turned for header in headers)
    spec = FeatureSpec(dtype="uint8", shape=(int(height), int(width), int(channels)), encoding="raw_bytes")
    if data.limit:  # the first `limit` files in sorted order: named one by one (quick trials only)
        chosen = sorted((path, label, split) for _, label, split, files in listing for path in files)[:data.limit]
        tasks = (("files", tuple(chosen)),)
        classes = {label for _, label, _ in chosen}
    else:  # the images directly in the root (only without labels) are one task, each folder below it one
        tasks = tuple(("loose", folder) if folder == root else ("folder", folder, label, split)
                      for folder, label, split, _ in listing)
        classes = {label for _, label, _, _ in listing}
    class_names = class_names_of(classes) if labels else ()
    read = [path for path, _, _ in chosen] if data.limit else [path for *_, files in listing for path in files]
    unserved = sorted(path[len(root) + 1:] for path in read if path.lower().endswith(UNSERVED_EXTENSIONS))
    plan = SourcePlan(uri, "folder", "image", "image", spec, class_names, has_splits, tasks,
                      min(count, data.limit or count),
                      {"root": root, "skipped": len(skipped), "skipped_examples": tuple(skipped[:3]),
                       "unserved": len(unserved), "unserved_examples": tuple(map(safe_key, unserved[:2])),
                       "narrow_16_bit": (len(sixteen_bit), max(sixteen_bit))
                       if sixteen_bit and max(sixteen_bit) < 4096 else None,
                       "mixed_sizes": (share, len(headers), len(sizes)) if len(sizes) > 1 and not data.image_size
                       else None, "rotated": (turned, len(headers)) if turned else None, "capped": capped})
    return plan


def read_folder_task(plan: SourcePlan, task):
    root = plan.options["root"]
    if task[0] == "files":
        for path, label, split in task[1]:
            yield SourceRecord(safe_key(path[len(root) + 1:]), path, label, split)
    elif task[0] == "loose":
        yield from read_loose_images(root)
    else:
        yield from read_class_folder(root, *task[1:])
