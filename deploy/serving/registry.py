"""The models being served: RUN/export/NAME/VERSION under a version policy, rescanned for changes.

TF Serving's rules, plus one of ours: only versions that `kcp validate` blessed
(assets.extra/validation.json with "blessed": true) are served unless `allow_unvalidated`.
Each scan (at most one at a time, every `poll_seconds`) loads the versions the policy wants
once, unloads those it no longer wants (deleted folders included), and records a failed load
once, retrying it on a later scan with exponential backoff. Remote run directories (gs://)
are read through kcp.core.storage: each version is copied to a local folder, then loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus

from deploy.saved_model import load_export
from deploy.serving.batching import Batcher
from deploy.serving.codec import RequestError
from deploy.serving.versions import LoadedVersion, parse_labels, parse_policy, replay_warmup
from kcp.core import storage
from kcp.core.contract import read_lines
from kcp.core.errors import UserError
from kcp.core.layout import is_blessed

log = logging.getLogger("kcp.serve")
MAX_BACKOFF_S = 300.0
MISS_SCAN_S = 0.5  # a request for a version not loaded rescans at most this often


class NotLoadedYet(Exception):
    """`get(..., wait=False)` missed: the request must wait for a scan, off the event loop."""


@dataclass
class Failure:
    error: str
    attempts: int
    retry_at: float


class ModelRegistry:
    """The export folders of a run, RUN/export/NAME/VERSION, served under a version policy."""

    def __init__(self, export_root: str, max_batch_size: int = 32, batch_timeout_ms: float = 2.0,
                 batching: bool = True, *, policy: str = "latest:1", allow_unvalidated: bool = False,
                 labels: dict | list | None = None, poll_seconds: float = 1.0):
        self.export_root = export_root
        self.max_batch_size, self.timeout_s, self.batching = max_batch_size, batch_timeout_ms / 1000.0, batching
        self.policy = parse_policy(policy)
        self.labels = parse_labels(labels)  # {(model name, or None for every model, label): version}
        self.allow_unvalidated, self.poll_seconds = allow_unvalidated, poll_seconds
        self.models: dict[str, dict[int, LoadedVersion]] = {}
        self.failures: dict[str, dict[int, Failure]] = {}
        self.unblessed: dict[str, set] = {}  # complete versions left out for want of a blessing
        self.ended: dict[str, set] = {}  # versions served once and unloaded since: END in the status
        self.loads = 0  # tf.saved_model.load calls, for tests
        self.lock = threading.Lock()  # guards the dicts above
        self.scan_lock = threading.Lock()  # one scan at a time
        self.last_scan = float("-inf")
        self.remote = storage.is_remote(export_root)
        self.staging = tempfile.mkdtemp(prefix="kcp-serve-") if self.remote else None

    # ---- scanning

    def _candidates(self, versions) -> tuple[list[int], int]:
        """(versions in the order to try, how many of them to serve) under the policy. For
        latest:N, a version that fails to load gives way to the next older one (as TF Serving's
        availability-preserving policy keeps the old version when the new one fails)."""
        kind, argument = self.policy
        if kind == "latest":
            return sorted(versions, reverse=True), argument
        chosen = sorted(versions) if kind == "all" else sorted(set(versions) & argument)
        return chosen, len(chosen)

    def _local_copy(self, name: str, version: int, path: str) -> str:
        """A remote version folder copied to local disk through kcp.core.storage (afresh: no file of
        an earlier, failed copy stays); `_discard_copy` removes it once the version is unloaded."""
        target = self._discard_copy(name, version)
        prefix = path.rstrip("/") + "/"
        for remote in [n for n in storage.glob(prefix + "**") if not n.endswith("/")]:  # not TF's folder markers
            local = os.path.join(target, remote[len(prefix):])
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as handle:
                handle.write(storage.read_bytes(remote))
        return target

    def _discard_copy(self, name: str, version: int) -> str | None:
        """Removes a gs:// version's local copy (the loaded model needs none of its files), so that a
        server that follows many pushes keeps one copy a served version; returns its path."""
        if not self.staging:
            return None
        target = os.path.join(self.staging, name, str(version))
        shutil.rmtree(target, ignore_errors=True)
        return target

    def _load(self, name: str, version: int, path: str) -> None:
        local = os.path.join(self.staging, name, str(version)) if self.remote else path
        try:
            local = self._local_copy(name, version, path) if self.remote else path
            self.loads += 1
            model = load_export(local)
            replay_warmup(model, local)
            labels = storage.join(path, "assets.extra", "labels.txt")
            class_names = read_lines(storage.read_text(labels)) if storage.exists(labels) else []
        except Exception as error:  # noqa: BLE001  a broken export must not stop the server
            self._discard_copy(name, version)
            with self.lock:
                previous = self.failures.setdefault(name, {}).get(version)
                attempts = previous.attempts + 1 if previous else 1
                backoff = min(MAX_BACKOFF_S, max(self.poll_seconds, 1.0) * 2 ** attempts)
                message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
                message = message.replace(local, path) if self.remote else message  # the gs:// version's name
                self.failures[name][version] = Failure(message, attempts, time.monotonic() + backoff)
            log.error("serve: cannot load %s (attempt %d, next in %.0f s): %s", path, attempts, backoff, message)
            return
        with self.lock:
            self.models.setdefault(name, {})[version] = LoadedVersion(version, path, model, class_names)
            self.ended.get(name, set()).discard(version)
            self.failures.get(name, {}).pop(version, None)
        log.info("serve: loaded %s version %d", name, version)

    def scan(self) -> None:
        """Brings the loaded versions in line with the folders and the policy (one scan at a time)."""
        with self.scan_lock:
            self._scan()
            self.last_scan = time.monotonic()

    def _scan(self) -> None:
        first = self.last_scan == float("-inf")
        try:
            if first and not storage.exists(self.export_root):  # say so instead of serving nothing
                raise UserError(f"{self.export_root}: no exports there (run `kcp export` first, or check the path)")
            names = storage.list_dir(self.export_root) if storage.exists(self.export_root) else []
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001
            if first:
                raise UserError(f"{self.export_root}: cannot list the exports: "
                                f"{str(error).strip().splitlines()[0] if str(error).strip() else error!r}") from None
            log.error("serve: cannot list %s: %s", self.export_root, error)
            return
        seen = {name for name in names if self._scan_model(name, storage.join(self.export_root, name))}
        with self.lock:
            gone = {name: self.models.pop(name) for name in set(self.models) - seen}  # whole model folders deleted
            for table in (self.failures, self.unblessed, self.ended):
                for name in set(table) - seen:
                    del table[name]
        for name, versions in gone.items():  # outside the lock: requests go on while the copies are deleted
            for loaded in versions.values():
                loaded.unload()
                self._discard_copy(name, loaded.version)

    def _scan_model(self, name: str, directory: str) -> bool:
        """One model's folder: loads and unloads versions per the policy; False when it has none."""
        try:
            complete = {int(v): storage.join(directory, v) for v in storage.list_dir(directory) if v.isdigit()}
        except (OSError, NotADirectoryError):
            return False  # a file, not a model folder
        complete = {v: p for v, p in complete.items() if storage.exists(storage.join(p, "saved_model.pb"))}
        if not complete:
            return False
        eligible = {v: p for v, p in complete.items() if self.allow_unvalidated or is_blessed(p)}
        now = time.monotonic()
        with self.lock:
            self.unblessed[name] = set(complete) - set(eligible)
            loaded = set(self.models.get(name, {}))
            failures = self.failures.setdefault(name, {})
            for version in set(failures) - set(eligible):
                del failures[version]

        def available(version: int) -> bool:
            with self.lock:  # not `loaded`: a labelled version loaded earlier in this scan is loaded once
                if version in self.models.get(name, {}):
                    return True
            failure = failures.get(version)
            if failure is not None and failure.retry_at > now:
                return False  # failed before: retried on a later scan, after its backoff
            self._load(name, version, eligible[version])
            with self.lock:
                return version in self.models.get(name, {})

        # a labelled version is always served
        labelled = {v for (model, _), v in self.labels.items() if model in (None, name)} & set(eligible)
        served = {version for version in labelled if available(version)}
        order, count = self._candidates(eligible)
        for version in order:
            if count <= 0:
                break
            if available(version):
                served.add(version)
                count -= 1
        with self.lock:
            unloaded = [self.models[name].pop(version) for version in loaded - served]
            self.ended.setdefault(name, set()).update(version.version for version in unloaded)
        for version in unloaded:  # outside the lock: requests go on while the copy is deleted
            version.unload()
            self._discard_copy(name, version.version)
            log.info("serve: unloaded %s version %d", name, version.version)
        return True

    def refresh(self, wait: bool = False, interval: float | None = None) -> None:
        """Scans when the last scan is older than `interval` (default `poll_seconds`); without `wait`,
        never blocks behind a scan in progress (requests for loaded versions go on meanwhile)."""
        interval = self.poll_seconds if interval is None else interval
        if time.monotonic() - self.last_scan < interval:
            return
        if not self.scan_lock.acquire(blocking=wait):
            return
        try:
            if time.monotonic() - self.last_scan >= interval:
                self._scan()
                self.last_scan = time.monotonic()
        finally:
            self.scan_lock.release()

    def close(self) -> None:
        """Unloads every version and removes a gs:// run's staging folder (RestServer.server_close)."""
        with self.lock:
            for loaded in (loaded for versions in self.models.values() for loaded in versions.values()):
                loaded.unload()
            self.models.clear()
        if self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)

    def poll_forever(self, stop: threading.Event) -> None:
        """The background scanner: a deleted version is unloaded within one interval, requests or not."""
        while not stop.wait(self.poll_seconds):
            try:
                self.refresh(wait=True)
            except Exception as error:  # noqa: BLE001  storage down: one line a scan, serving goes on
                log.error("serve: scan failed: %s", str(error).strip().splitlines()[0][:300] if str(error).strip()
                          else type(error).__name__)
                log.debug("serve: scan failed", exc_info=True)

    # ---- lookups

    def _not_served(self, name: str, version: int) -> str:
        if version in self.unblessed.get(name, ()):
            return f"; version {version} is not blessed by kcp validate (serve it with --allow-unvalidated)"
        failure = self.failures.get(name, {}).get(version)
        return f"; version {version} failed to load: {failure.error}" if failure else ""

    def resolve(self, name: str, version: str | None = None, label: str | None = None) -> int | None:
        """The version a request names: a number, a label's version, or None (the latest)."""
        if label is not None:
            number = self.labels.get((name, label), self.labels.get((None, label)))
            if number is None:
                raise RequestError(f"Unrecognized servable version label: {label}")
            return number
        return None if version is None else int(version)

    def get(self, name: str, version: str | None = None, label: str | None = None, *,
            wait: bool = True) -> LoadedVersion:
        """The loaded version a request names. On a miss it rescans (and loads) first, which can
        take seconds; with `wait=False` a miss raises NotLoadedYet instead (for an event loop)."""
        number = self.resolve(name, version, label)
        for attempt in range(2):
            with self.lock:
                versions = self.models.get(name) or {}
                if number is None and versions:
                    return versions[max(versions)]
                if number in versions:
                    return versions[number]
            if not wait:
                raise NotLoadedYet(name)
            if attempt == 0:  # a version that appeared since the last scan: loaded once, the others wait
                self.refresh(wait=True, interval=min(self.poll_seconds, MISS_SCAN_S))
        with self.lock:
            if number is None:
                latest = max(self.unblessed.get(name) or self.failures.get(name) or [0])
                raise RequestError(f"Servable not found for request: Latest({name})"
                                   + (self._not_served(name, latest) if latest else ""), HTTPStatus.NOT_FOUND)
            raise RequestError(f"Servable not found for request: Specific({name}, {number})"
                               + self._not_served(name, number), HTTPStatus.NOT_FOUND)

    def status(self, name: str, version: str | None = None, label: str | None = None) -> list[dict]:
        """TF Serving's GetModelStatus entries: loaded versions AVAILABLE, failed loads END with the error."""
        number = self.resolve(name, version, label)
        self.refresh()
        with self.lock:
            entries = {v: ("AVAILABLE", "OK", "") for v in self.models.get(name, {})}
            for v, failure in self.failures.get(name, {}).items():
                entries.setdefault(v, ("END", "UNKNOWN", failure.error))
            # as TF Serving's ServableStateMonitor keeps them (one that lost its blessing: the 404 below)
            for v in self.ended.get(name, set()) - self.unblessed.get(name, set()):
                entries.setdefault(v, ("END", "OK", ""))
        if not entries:
            unblessed = sorted(self.unblessed.get(name, ()))
            hint = (f"; versions {unblessed} are not blessed by kcp validate (serve them with --allow-unvalidated)"
                    if unblessed else "")
            raise RequestError(f"Could not find any versions of model {name}{hint}", HTTPStatus.NOT_FOUND)
        if number is not None and number not in entries:
            hint = "; it is not blessed by kcp validate (serve it with --allow-unvalidated)"
            raise RequestError(f"Could not find version {number} of model {name}"
                               f"{hint if number in self.unblessed.get(name, ()) else ''}", HTTPStatus.NOT_FOUND)
        return [{"version": v, "state": s, "error_code": c, "error_message": m}  # newest first, as TF Serving's
                for v, (s, c, m) in sorted(entries.items(), reverse=True) if number in (None, v)]  # VersionMap

    def served(self) -> dict[str, list[int]]:
        with self.lock:
            return {name: sorted(versions) for name, versions in self.models.items() if versions}

    def call(self, loaded: LoadedVersion, signature: str, inputs: dict) -> dict:
        """Runs one call of `signature` ({name: NumPy array} out), through the batcher if it can."""
        batcher = self._batcher(loaded, signature, inputs)
        if batcher is None:
            return {name: value.numpy() for name, value in loaded.signature(signature)(**inputs).items()}
        return batcher(inputs)

    def submit(self, loaded: LoadedVersion, signature: str, inputs: dict) -> Future | None:
        """Queues one call in the batcher without waiting: a Future of what `call` returns, or None
        where the call cannot be batched (the caller then runs `call`, off the event loop)."""
        batcher = self._batcher(loaded, signature, inputs)
        return None if batcher is None else batcher.submit(inputs)

    def _batcher(self, loaded: LoadedVersion, signature: str, inputs: dict) -> Batcher | None:
        # a signature with scalar inputs (generate's settings) runs alone: requests with other
        # settings cannot share a batch, and their rows have no common first dimension to split
        if not self.batching or any(value.shape.rank == 0 for value in inputs.values()):
            return None
        function = loaded.signature(signature)
        with self.lock:
            batcher = loaded.batchers.get(signature)
            if batcher is None:
                batcher = loaded.batchers[signature] = Batcher(function, self.max_batch_size, self.timeout_s)
        return batcher
