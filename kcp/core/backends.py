"""The storage backend interface and the local one (the standard library only).

The remote backends (Beam's FileSystems, tf.io.gfile) are in kcp/core/remote.py;
kcp/core/storage.py picks one per URI scheme and is what the code base calls.
"""

from __future__ import annotations

import abc
import glob as _glob
import os
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
    def rename(self, source: str, target: str, overwrite: bool = True) -> None:
        """Moves a file. overwrite=True replaces an existing target; overwrite=False raises
        FileExistsError when the target exists and leaves both files as they were (atomically on
        local disks and gs://: of two racing renames onto one name, one fails)."""

    def list_files(self, path: str) -> list[str]:
        """Every file below the folder `path`, as paths relative to it with "/" separators, sorted."""
        raise NotImplementedError

    def create_exclusive(self, path: str, content: bytes) -> bool:
        """Writes `path` whole only if it does not exist yet; False when it does. Atomic where the
        backend says so (local: a hard link; gs://: a generation precondition)."""
        if self.exists(path):
            return False
        self.write_bytes_atomic(path, content)
        return True

    def remove_if_content(self, path: str, content: bytes) -> bool:
        """Deletes `path` only if it still holds `content`; False when it does not (or is gone)."""
        try:
            if self.read_bytes(path) != content:
                return False
        except Exception:  # noqa: BLE001  absent, however the backend says it
            return False
        self.remove(path)
        return True


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

    def list_files(self, path):
        found = []
        for directory, _, names in os.walk(path):
            found += [os.path.relpath(os.path.join(directory, name), path).replace(os.sep, "/") for name in names]
        return sorted(found)

    def rename(self, source, target, overwrite=True):
        if overwrite:
            os.replace(source, target)
        elif os.path.isdir(source):  # os.rename fails over a non-empty folder, not over an empty one
            if os.path.lexists(target):
                raise FileExistsError(f"{target} exists")
            os.rename(source, target)
        else:
            try:
                os.link(source, target)  # fails when the target exists, atomically
            except FileExistsError:
                raise FileExistsError(f"{target} exists") from None
            os.remove(source)

    def create_exclusive(self, path, content):
        # The content goes to a unique temporary first; os.link then publishes it whole, and
        # fails (EEXIST) when `path` exists, atomically, on every local filesystem kcp supports.
        temporary = _temporary(path)
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(temporary)

    def remove_if_content(self, path, content):
        # Move it aside under a unique name first (atomic), then check what was moved: another
        # process's newer file is put back (os.link fails, leaving nothing lost, if yet another appeared).
        aside = _temporary(path)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as handle:
            moved = handle.read()
        if moved == content:
            os.remove(aside)
            return True
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # a third writer took `path` within these microseconds; its file stays
        finally:
            os.remove(aside)
        return False
