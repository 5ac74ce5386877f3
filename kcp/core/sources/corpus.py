"""Text corpora for language modelling (modality `language`): `text:PATH` and `python-stdlib`.

    text:PATH       every file below the folder PATH (recursively), or the one file PATH; local or gs://
    python-stdlib   the embedded default: the top-level `*.py` modules of this Python's standard
                    library (sysconfig's "stdlib" folder, sorted; CPython 3.11: 168 files, 4.7 MB)

Each file is one document; its key is its path relative to the source root (for one file,
its name), so the split (the stable hash of the key) keeps a document whole in one split.
Every file is read, whatever its extension, except hidden ones (a path part starting with
".", such as .git/): a file with NUL bytes (binary) or bytes that are not UTF-8 goes to the
dead letters with the reason, and an empty file is skipped (it holds no text). Documents are
read as bytes and decoded strictly, so the `bytes` tokenizer sees exactly the file's bytes.

The driver only lists (names and sizes: the sizes fix how many packing groups a split gets,
pipeline/language.py); the read tasks are the root's top-level entries (a worker lists a
subfolder itself), so the graph stays small whatever the number of files. With `data.limit`
the tasks name the first `limit` files (sorted) instead. `python-stdlib`'s tasks name module
files relative to the standard library, which each worker finds in its own Python: the
corpus is the same on every machine with the same Python version, offline.
"""

from __future__ import annotations

import os
import sysconfig

from kcp.core import storage
from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.sources.base import (BadInput, SourceError, SourcePlan, SourceRecord, check_path, has_surrogates,
                                   read_input_file, safe_key)

STDLIB_URI = "python-stdlib"
TASK_FILES = 32  # files per read task when the tasks name files (python-stdlib, data.limit)


def language_spec(data: DataConfig) -> FeatureSpec:
    """One block of the token stream: context_length inputs and one more for the last target."""
    return FeatureSpec("int64", (data.context_length + 1,), "int64_list")


def _plan(uri: str, kind: str, tasks, files: int, total_bytes: int, data: DataConfig, **options) -> SourcePlan:
    return SourcePlan(uri, kind, "language", "tokens", language_spec(data), (), False, tuple(tasks), files,
                      {"bytes": total_bytes, **options})


def _chunks(names: list[str]) -> list[tuple]:
    return [tuple(names[start:start + TASK_FILES]) for start in range(0, len(names), TASK_FILES)]


# --- python-stdlib ----------------------------------------------------------------------

def stdlib_root() -> str:
    """This Python's standard library folder (on the driver and, separately, on each worker)."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[tuple[str, int]]:
    """(name, size) of the top-level `*.py` modules of the standard library, sorted by name.

    Only the top level: the packages (asyncio/, email/, ...) and the test suite would triple
    the size; 3-8 MB is what a 30-minute CPU training run sees a useful share of.
    """
    root = stdlib_root()
    return sorted((entry.name, entry.stat().st_size) for entry in os.scandir(root)
                  if entry.name.endswith(".py") and entry.is_file())


def plan_stdlib(uri: str, data: DataConfig) -> SourcePlan:
    files = stdlib_files()
    if data.limit:
        files = files[:data.limit]
    if not files:
        raise SourceError(f"data.source: {uri}: no *.py files in {stdlib_root()}")
    names = [name for name, _ in files]
    return _plan(uri, STDLIB_URI, [("stdlib", chunk) for chunk in _chunks(names)], len(files),
                 sum(size for _, size in files), data)


# --- text:PATH ---------------------------------------------------------------------------

def _visible(relative: str) -> bool:
    return not any(part.startswith(".") for part in relative.split("/"))


def list_corpus(root: str) -> list[tuple[str, int]]:
    """(path relative to `root` with "/" separators, size) of every visible file below `root`, sorted."""
    root = root.rstrip("/")
    if storage.is_remote(root):
        from apache_beam.io.filesystems import FileSystems

        found = [(item.path[len(root) + 1:], item.size_in_bytes)
                 for item in FileSystems.match([f"{root}/**"])[0].metadata_list if not item.path.endswith("/")]
    else:
        found = []
        for directory, folders, names in os.walk(root):
            folders[:] = [name for name in folders if not name.startswith(".")]
            for name in names:
                path = os.path.join(directory, name)
                if os.path.isfile(path) or os.path.islink(path):  # a broken link is a dead letter, as with images
                    found.append((os.path.relpath(path, root).replace(os.sep, "/"), os.stat(path).st_size
                                  if os.path.exists(path) else 0))
    return sorted(item for item in found if _visible(item[0]))


def plan_text(uri: str, path: str, data: DataConfig) -> SourcePlan:
    check_path(uri, path)
    path = path.rstrip("/")
    files = list_corpus(path)
    if not files:  # no file below: PATH is one file (or an empty folder)
        if storage.is_remote(path) or os.path.isfile(path):
            root, name = path.rsplit("/", 1) if "/" in path else (".", path)
            size = len(storage.read_bytes(path)) if storage.is_remote(path) else os.path.getsize(path)
            return _plan(uri, "text", [("files", root, (_portable(name),))], 1, size, data, root=root)
        raise SourceError(f"data.source: {path} holds no files")
    if data.limit:
        files = files[:data.limit]
        tasks = [("files", path, tuple(map(_portable, chunk))) for chunk in _chunks([name for name, _ in files])]
    else:
        tops = sorted({name.split("/", 1)[0] for name, _ in files})
        tasks = [("entry", path, _portable(top)) for top in tops]
    return _plan(uri, "text", tasks, len(files), sum(size for _, size in files), data, root=path)


def read_corpus_task(plan: SourcePlan, task):
    """The records of one read task (on a worker): key = path relative to the root, payload = path."""
    if task[0] == "stdlib":
        root = stdlib_root()
        for name in task[1]:
            yield SourceRecord(name, os.path.join(root, name), "")
        return
    kind, root, what = task
    if kind == "files":
        names = [os.fsdecode(name) for name in what]
    else:  # a top-level entry: a subfolder, listed here, or a file (which lists as nothing)
        what = os.fsdecode(what)
        below = list_corpus(f"{root}/{what}")
        names = [f"{what}/{name}" for name, _ in below] if below else [what]
    for name in names:  # a name that is not UTF-8: its key keeps the bytes as \xNN escapes
        yield SourceRecord(safe_key(name), f"{root}/{name}", "")


def _portable(name: str):
    """A file name as a read task carries it: the name, or its bytes when it is not UTF-8 (Beam
    encodes a task's strings as UTF-8, which a name's undecodable bytes cannot be)."""
    return os.fsencode(name) if has_surrogates(name) else name


def decode_document(path: str) -> str:
    """A file's text; BadInput for a binary file or bytes that are not UTF-8."""
    raw = read_input_file(path)
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # what Notepad's "Unicode" saves: its NULs are not binary
        raise BadInput(f"UTF-16 text (byte order mark {raw[:2].hex(' ').upper()}), not UTF-8; save the file as UTF-8")
    if b"\x00" in raw:
        raise BadInput("binary file (it holds NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"not UTF-8 text (byte {error.start}: {raw[error.start:error.start + 4]!r}); "
                       "save the file as UTF-8") from None
