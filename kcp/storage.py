"""Small-file I/O on a local path or a `gs://` URI, the one place that tells them apart.

Local paths use the standard library, so that local runs never import TensorFlow just to
read a YAML or JSON file; remote URIs go through `tf.io.gfile`, which the trainer's
`tf.data` input uses too.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
import uuid


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    if is_remote(path):
        with _gfile().GFile(path, "r") as handle:
            return handle.read()
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` so that readers see the old file or the whole new one, never a part."""
    directory = posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)
    if directory:
        makedirs(directory)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    if is_remote(path):
        gfile = _gfile()
        with gfile.GFile(temporary, "w") as handle:
            handle.write(text)
        gfile.rename(temporary, path, overwrite=True)
        return
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def glob(pattern: str) -> list[str]:
    if is_remote(pattern):
        return sorted(_gfile().glob(pattern))
    return sorted(_glob.glob(pattern))


def remove_tree(path: str) -> None:
    if not exists(path):
        return
    if is_remote(path):
        _gfile().rmtree(path)
    else:
        import shutil

        shutil.rmtree(path)


def remove(path: str) -> None:
    """Deletes one file if it exists."""
    if is_remote(path):
        if _gfile().exists(path):
            _gfile().remove(path)
    elif os.path.exists(path):
        os.remove(path)


def list_dir(path: str) -> list[str]:
    if not exists(path):
        return []
    return sorted(_gfile().listdir(path) if is_remote(path) else os.listdir(path))


def rename(source: str, target: str) -> None:
    if is_remote(source):
        _gfile().rename(source, target, overwrite=False)
    else:
        os.rename(source, target)
