"""Small-file I/O on a local path or a remote URI (`gs://`): the one place that tells them apart.

Each URI scheme is served by one backend, picked by `backend_for(path)` and cached per scheme:

- `LocalBackend` (no "://"): the standard library, so local runs never import TensorFlow or
  Beam just to read a YAML or JSON file.
- `BeamBackend`: Beam's FileSystems, for every scheme Beam has a filesystem for (with the
  `gcp` extra, gs:// goes through the google-cloud-storage client, which honours
  STORAGE_EMULATOR_HOST).
- `GfileBackend`: `tf.io.gfile`, for the schemes Beam has no filesystem for.

Object stores have no folders: there, a "folder" exists when something lies under it. The
module-level functions below are what the code base calls; each delegates to the backend.
"""

from __future__ import annotations

import abc
import glob as _glob
import os
import posixpath
import shutil
import uuid


class Backend(abc.ABC):
    """The operations a scheme must provide; every path is a full local path or URI."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...
    @abc.abstractmethod
    def makedirs(self, path: str) -> None: ...
    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes: ...
    @abc.abstractmethod
    def write_bytes_atomic(self, path: str, content: bytes) -> None: ...
    @abc.abstractmethod
    def glob(self, pattern: str) -> list[str]: ...
    @abc.abstractmethod
    def remove(self, path: str) -> None: ...
    @abc.abstractmethod
    def remove_tree(self, path: str) -> None: ...
    @abc.abstractmethod
    def list_dir(self, path: str) -> list[str]: ...
    @abc.abstractmethod
    def rename(self, source: str, target: str) -> None: ...


def _temporary(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex[:8]}"


class LocalBackend(Backend):
    def exists(self, path):
        return os.path.exists(path)

    def makedirs(self, path):
        os.makedirs(path, exist_ok=True)

    def read_bytes(self, path):
        with open(path, "rb") as handle:
            return handle.read()

    def write_bytes_atomic(self, path, content):
        temporary = _temporary(path)
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

    def glob(self, pattern):
        return sorted(_glob.glob(pattern))

    def remove(self, path):
        if os.path.exists(path):
            os.remove(path)

    def remove_tree(self, path):
        if os.path.exists(path):
            shutil.rmtree(path)

    def list_dir(self, path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def rename(self, source, target):
        os.rename(source, target)


class BeamBackend(Backend):
    """Beam's FileSystems. In its globs `*` stops at "/" and `**` does not."""

    def __init__(self):
        # Lazy: reading a local YAML must not import Beam (measured: ~1.5 s per process).
        from apache_beam.io.filesystems import FileSystems

        self.fs = FileSystems

    def _under(self, path: str) -> list[str]:
        """Every object below the "folder" `path`."""
        return [metadata.path for metadata in self.fs.match([path.rstrip("/") + "/**"])[0].metadata_list]

    def exists(self, path):
        return self.fs.exists(path) or bool(self._under(path))

    def makedirs(self, path):
        pass  # object stores need no folders

    def read_bytes(self, path):
        with self.fs.open(path) as handle:
            return handle.read()

    def write_bytes_atomic(self, path, content):
        temporary = _temporary(path)
        with self.fs.create(temporary) as handle:
            handle.write(content)
        if self.fs.exists(path):
            self.fs.delete([path])
        self.fs.rename([temporary], [path])

    def glob(self, pattern):
        return sorted(metadata.path for metadata in self.fs.match([pattern])[0].metadata_list)

    def remove(self, path):
        if self.fs.exists(path):
            self.fs.delete([path])

    def remove_tree(self, path):
        paths = self._under(path)
        if paths:
            self.fs.delete(paths)

    def list_dir(self, path):
        prefix = path.rstrip("/") + "/"
        names = {child[len(prefix):].split("/", 1)[0] for child in self._under(path)}
        return sorted(name for name in names if name)

    def rename(self, source, target):
        self.fs.rename([source], [target])


class GfileBackend(Backend):
    """`tf.io.gfile`, for the schemes Beam has no filesystem for."""

    def __init__(self):
        # Lazy: reading a local YAML must not import TensorFlow (measured: ~5-7 s per process).
        import tensorflow as tf

        self.gfile = tf.io.gfile

    def exists(self, path):
        return self.gfile.exists(path)

    def makedirs(self, path):
        self.gfile.makedirs(path)

    def read_bytes(self, path):
        with self.gfile.GFile(path, "rb") as handle:
            return handle.read()

    def write_bytes_atomic(self, path, content):
        temporary = _temporary(path)
        with self.gfile.GFile(temporary, "wb") as handle:
            handle.write(content)
        self.gfile.rename(temporary, path, overwrite=True)

    def glob(self, pattern):
        return sorted(self.gfile.glob(pattern))

    def remove(self, path):
        if self.gfile.exists(path):
            self.gfile.remove(path)

    def remove_tree(self, path):
        if self.gfile.exists(path):
            self.gfile.rmtree(path)

    def list_dir(self, path):
        return sorted(name.rstrip("/") for name in self.gfile.listdir(path)) if self.gfile.exists(path) else []

    def rename(self, source, target):
        self.gfile.rename(source, target, overwrite=False)


_BACKENDS: dict[str | None, Backend] = {}  # by scheme, the text before "://"; None for local paths


def backend_for(path: str) -> Backend:
    """The backend serving `path`: local without "://", else Beam's if Beam has a filesystem, else gfile."""
    scheme = str(path).split("://", 1)[0] if is_remote(path) else None
    if scheme not in _BACKENDS:
        _BACKENDS[scheme] = LocalBackend() if scheme is None else _remote_backend(str(path))
    return _BACKENDS[scheme]


def _remote_backend(path: str) -> Backend:
    from apache_beam.io.filesystems import FileSystems

    try:
        FileSystems.get_filesystem(path)
    except ValueError:  # Beam has no filesystem for this scheme
        return GfileBackend()
    return BeamBackend()


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    return backend_for(path).exists(path)


def makedirs(path: str) -> None:
    backend_for(path).makedirs(path)


def read_bytes(path: str) -> bytes:
    return backend_for(path).read_bytes(path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes_atomic(path: str, content: bytes) -> None:
    """Writes so that readers see the old file or the whole new one, never a part."""
    backend_for(path).write_bytes_atomic(path, content)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def glob(pattern: str) -> list[str]:
    return backend_for(pattern).glob(pattern)


def remove(path: str) -> None:
    """Deletes one file if it exists."""
    backend_for(path).remove(path)


def remove_tree(path: str) -> None:
    """Deletes a folder (or everything under a remote prefix) if it exists."""
    backend_for(path).remove_tree(path)


def list_dir(path: str) -> list[str]:
    """Names of the entries directly under `path` (files and folders), sorted."""
    return backend_for(path).list_dir(path)


def rename(source: str, target: str) -> None:
    backend_for(source).rename(source, target)
