"""Small-file I/O on a local path or a `gs://` URI: the one place that tells them apart.

Local paths use the standard library, so local runs never import TensorFlow or Beam just
to read a YAML or JSON file. Remote URIs go through Beam's FileSystems (with the `gcp`
extra: the google-cloud-storage client, which honours STORAGE_EMULATOR_HOST) and fall back
to `tf.io.gfile` where Beam has no filesystem for the scheme.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
import shutil
import uuid


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _beam_filesystems(path: str):
    """Beam's FileSystems if it can serve `path`, else None."""
    from apache_beam.io.filesystems import FileSystems

    try:
        FileSystems.get_filesystem(path)
    except ValueError:
        return None
    return FileSystems


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    beam = _beam_filesystems(path)
    if beam is None:
        return _gfile().exists(path)
    # object stores have no folders: a "folder" exists when something lies under it
    # (in Beam's globs `*` stops at "/", `**` does not)
    return beam.exists(path) or bool(beam.match([path.rstrip("/") + "/**"])[0].metadata_list)


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
    elif _beam_filesystems(path) is None:
        _gfile().makedirs(path)
    # Beam's object-store filesystems need no folders


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as handle:
            return handle.read()
    beam = _beam_filesystems(path)
    if beam is None:
        with _gfile().GFile(path, "rb") as handle:
            return handle.read()
    with beam.open(path) as handle:
        return handle.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes_atomic(path: str, content: bytes) -> None:
    """Writes so that readers see the old file or the whole new one, never a part."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    if not is_remote(path):
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            with open(temporary, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        return
    beam = _beam_filesystems(path)
    if beam is None:
        gfile = _gfile()
        with gfile.GFile(temporary, "wb") as handle:
            handle.write(content)
        gfile.rename(temporary, path, overwrite=True)
        return
    with beam.create(temporary) as handle:
        handle.write(content)
    if beam.exists(path):
        beam.delete([path])
    beam.rename([temporary], [path])


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def glob(pattern: str) -> list[str]:
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern))
    beam = _beam_filesystems(pattern)
    if beam is None:
        return sorted(_gfile().glob(pattern))
    return sorted(metadata.path for metadata in beam.match([pattern])[0].metadata_list)


def remove(path: str) -> None:
    """Deletes one file if it exists."""
    if not is_remote(path):
        if os.path.exists(path):
            os.remove(path)
        return
    beam = _beam_filesystems(path)
    if beam is None:
        if _gfile().exists(path):
            _gfile().remove(path)
    elif beam.exists(path):
        beam.delete([path])


def remove_tree(path: str) -> None:
    """Deletes a folder (or everything under a remote prefix) if it exists."""
    if not is_remote(path):
        if os.path.exists(path):
            shutil.rmtree(path)
        return
    beam = _beam_filesystems(path)
    if beam is None:
        if _gfile().exists(path):
            _gfile().rmtree(path)
        return
    paths = [metadata.path for metadata in beam.match([path.rstrip("/") + "/**"])[0].metadata_list]
    if paths:
        beam.delete(paths)


def list_dir(path: str) -> list[str]:
    """Names of the entries directly under `path` (files and folders), sorted."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    beam = _beam_filesystems(path)
    if beam is None:
        return sorted(name.rstrip("/") for name in _gfile().listdir(path)) if _gfile().exists(path) else []
    prefix = path.rstrip("/") + "/"
    names = {metadata.path[len(prefix):].split("/", 1)[0] for metadata in beam.match([prefix + "**"])[0].metadata_list}
    return sorted(name for name in names if name)


def rename(source: str, target: str) -> None:
    if not is_remote(source):
        os.rename(source, target)
        return
    beam = _beam_filesystems(source)
    if beam is None:
        _gfile().rename(source, target, overwrite=False)
    else:
        beam.rename([source], [target])
