"""One lock per run directory, held by the stage that writes into it.

    with run_lock(run_dir, "train"):
        ...

The lock is the object RUN/.kcp-lock (JSON: command, user, host, pid, start time and a random
token), created only if absent in one atomic step: a hard link on a local disk, an upload
with `ifGenerationMatch=0` on gs://. A second producing stage on the same run directory fails
at once with one line naming the holder. Within one thread the lock is re-entrant (`kcp run`
holds it over preprocess, train and export); another thread of the process (a notebook's
background training) is refused like another process.

Stale locks: a lock whose holder ran on this host and whose process no longer exists is
removed and taken over (the check is exact on one host: the pid is gone). A lock from another
host is never broken automatically, as its holder may still be running (a preemptible VM or a
Vertex AI job cannot be probed from here); the error says how to remove it. The removal of a
stale lock only deletes the lock that was read (compare-and-delete), so two processes breaking
the same stale lock cannot delete each other's fresh one.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import socket
import threading
import uuid

from kcp.core import storage
from kcp.core.cluster import worker_info
from kcp.core.errors import UserError

LOCK_NAME = ".kcp-lock"

_HELD: dict[tuple, list] = {}  # (lock path, thread) -> [content bytes, depth], for re-entry in this thread


class RunLockedError(UserError):
    """Another process holds the run directory's lock."""


def cluster_hint() -> str:
    """For a process that TF_CONFIG names as a non-chief worker yet takes the lock (it preprocesses, or
    trains with a strategy other than multi_worker, alone): why its chief's lock stops it."""
    try:
        kind, index, chief = worker_info()
    except UserError:
        return ""
    return "" if chief else (f" (TF_CONFIG names this process {kind} {index} of a cluster, but it does not train in "
                             "it: only train.strategy auto or multi_worker trains with the chief, which holds the lock)")


def lock_path(run_dir: str) -> str:
    return storage.join(run_dir, LOCK_NAME)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # Linux: a zombie (killed, not yet reaped by its parent) has exited and holds nothing
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def describe_holder(holder: dict) -> str:
    return (f"`kcp {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"user {holder.get('user', '?')}, since {holder.get('started', '?')})")


def _stale(holder: dict) -> bool:
    """True only when the holder certainly died: it ran on this host and its pid is gone."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def acquire(run_dir: str, command: str) -> bytes:
    """Takes the lock of `run_dir` for `command`; returns the lock's content (its identity)."""
    path = lock_path(run_dir)
    key = (path, threading.get_ident())
    if key in _HELD:
        _HELD[key][1] += 1
        return _HELD[key][0]
    content = json.dumps({
        "command": command, "user": _user(), "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "token": uuid.uuid4().hex,
    }, indent=2).encode()
    unread = None
    for _ in range(3):
        if storage.create_exclusive(path, content):
            _HELD[key] = [content, 1]
            return content
        try:
            seen = storage.read_bytes(path)
        except Exception as error:  # noqa: BLE001  gone (each backend says so its own way): released meanwhile,
            unread = error  # try again; or unreadable here (credentials that may create but not read objects)
            continue
        try:
            holder = json.loads(seen)
        except ValueError:
            holder = {}
        if holder and _stale(holder):
            storage.remove_if_content(path, seen)
            continue
        raise RunLockedError(f"{run_dir} is in use by {describe_holder(holder)}; wait for it to finish, or, "
                             f"if that process is gone, delete {path}{cluster_hint()}")
    if unread is not None and storage.exists(path):  # there all along, and never read: say why, not "taken"
        detail = " ".join(str(unread).split())[:200] or type(unread).__name__
        raise RunLockedError(f"{run_dir}: its lock {path} is there but cannot be read ({detail}); if no process "
                             "holds it, delete it")
    raise RunLockedError(f"{run_dir}: could not take its lock {path} (other processes keep taking it)")


def release(run_dir: str) -> None:
    key = (lock_path(run_dir), threading.get_ident())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        storage.remove_if_content(key[0], held[0])


@contextlib.contextmanager
def run_lock(run_dir: str, command: str):
    """Holds the lock of `run_dir` for the body; see the module docstring."""
    acquire(run_dir, command)
    try:
        yield
    finally:
        release(run_dir)
