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

import os
import posixpath

from kcp.core.backends import Backend, LocalBackend
from kcp.core.remote import OBJECT_STORES, BeamBackend, GfileBackend, gcs_client, split_gs_uri

__all__ = ["Backend", "LocalBackend", "BeamBackend", "GfileBackend", "OBJECT_STORES", "gcs_client", "split_gs_uri",
           "backend_for"]


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


def sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, hex: the fingerprint of what an artifact was made from."""
    import hashlib

    return hashlib.sha256(read_bytes(path)).hexdigest()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


FAULT_ENV = "KCP_KILL_AT"  # fault injection for the tests: see `fault_point`
_FAULT_HITS: dict = {}


def fault_point(when: str, path: str) -> None:
    """Kills this process (SIGKILL, as a preemption does) at a named point, for the fault-injection
    tests: with KCP_KILL_AT="before:metrics.json" the first write or rename whose target is named
    metrics.json dies before it, "after:model.keras:2" after the second one. A no-op otherwise."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    wanted_when, name, count = parts[0], parts[1], int(parts[2]) if len(parts) > 2 else 1
    if when != wanted_when or str(path).rstrip("/").replace(os.sep, "/").rsplit("/", 1)[-1] != name:
        return
    _FAULT_HITS[spec] = _FAULT_HITS.get(spec, 0) + 1
    if _FAULT_HITS[spec] == count:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_bytes_atomic(path: str, content: bytes) -> None:
    """Writes so that readers see the old file or the whole new one, never a part."""
    fault_point("before", path)
    backend_for(path).write_bytes_atomic(path, content)
    fault_point("after", path)


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


def remove_empty_folder(path: str) -> None:
    """Deletes a local folder if it is empty; otherwise, or remote (where an empty prefix is nothing), leaves it."""
    if not is_remote(path):
        try:
            os.rmdir(path)
        except OSError:  # not empty (another worker's backup is still there) or already gone
            pass


def list_dir(path: str) -> list[str]:
    """Names of the entries directly under `path` (files and folders), sorted."""
    return backend_for(path).list_dir(path)


def list_files(path: str) -> list[str]:
    """Every file below the folder `path` (recursively), relative to it with "/" separators, sorted."""
    return backend_for(path).list_files(path)


def rename(source: str, target: str) -> None:
    """Moves a file; an existing target is replaced, on every backend (local: atomically; gs://:
    copy then delete, so a reader sees the old or the new object, never none)."""
    fault_point("before", target)
    backend_for(source).rename(source, target)
    fault_point("after", target)


def create_exclusive(path: str, content: bytes) -> bool:
    """Writes `path` only if it does not exist yet: True if this call created it. On local disks
    and gs:// the check and the write are one atomic step, so of two racing callers one wins."""
    return backend_for(path).create_exclusive(path, content)


def remove_if_content(path: str, content: bytes) -> bool:
    """Deletes `path` only if it still holds `content` (so a file someone replaced meanwhile stays)."""
    return backend_for(path).remove_if_content(path, content)
