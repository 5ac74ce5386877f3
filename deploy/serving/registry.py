"""The models being served: RUN/export/NAME/VERSION, loaded once and rescanned for new versions."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from http import HTTPStatus

import tensorflow as tf

from deploy.serving.batching import Batcher
from deploy.serving.codec import RequestError
from kcp.core import storage
from kcp.core.layout import export_versions

log = logging.getLogger("kcp.serve")


@dataclass
class LoadedVersion:
    version: int
    path: str
    model: object  # what tf.saved_model.load returned; keeps the signatures' variables alive
    class_names: list  # from the export's assets.extra/labels.txt
    batchers: dict = field(default_factory=dict)

    @property
    def signatures(self) -> dict:
        return dict(self.model.signatures)

    def signature(self, name: str):
        """The concrete function of signature `name`, or a 400 naming the ones there are."""
        function = self.model.signatures.get(name)
        if function is None:
            raise RequestError(f"signature {name!r} not found; this model has {', '.join(self.model.signatures)}")
        return function


class ModelRegistry:
    """The export folders of a run: RUN/export/NAME/VERSION, rescanned for new versions."""

    def __init__(self, export_root: str, max_batch_size: int = 32, batch_timeout_ms: float = 2.0,
                 batching: bool = True):
        self.export_root = export_root
        self.max_batch_size, self.timeout_s, self.batching = max_batch_size, batch_timeout_ms / 1000.0, batching
        self.models: dict[str, dict[int, LoadedVersion]] = {}
        self.lock = threading.Lock()

    def scan(self) -> None:
        """Loads versions that appeared since the last scan (complete folders only)."""
        for name in storage.list_dir(self.export_root):
            directory = storage.join(self.export_root, name)
            for version in export_versions(directory):  # none when `name` is a file
                with self.lock:
                    if version in self.models.get(name, {}):
                        continue
                path = storage.join(directory, str(version))
                if not storage.exists(storage.join(path, "saved_model.pb")):
                    continue  # temporary or half-copied folders are never loaded
                try:
                    loaded = tf.saved_model.load(path)
                except Exception as error:  # noqa: BLE001  a broken export must not stop the server
                    log.error("serve: cannot load %s: %s", path, error)
                    continue
                labels = storage.join(path, "assets.extra", "labels.txt")
                class_names = storage.read_text(labels).splitlines() if storage.exists(labels) else []
                with self.lock:
                    self.models.setdefault(name, {})[version] = LoadedVersion(version, path, loaded, class_names)
                log.info("serve: loaded %s version %d", name, version)

    def get(self, name: str, version: str | None) -> LoadedVersion:
        self.scan()
        with self.lock:
            versions = self.models.get(name)
            if not versions:
                raise RequestError(f"Servable not found for request: Latest({name})", HTTPStatus.NOT_FOUND)
            if version is None:
                return versions[max(versions)]
            if not version.isdigit() or int(version) not in versions:
                raise RequestError(f"Servable not found for request: Specific({name}, {version})", HTTPStatus.NOT_FOUND)
            return versions[int(version)]

    def call(self, loaded: LoadedVersion, signature: str, inputs: dict) -> dict:
        function = loaded.signature(signature)
        if not self.batching:
            return {name: value.numpy() for name, value in function(**inputs).items()}
        with self.lock:
            batcher = loaded.batchers.get(signature)
            if batcher is None:
                batcher = loaded.batchers[signature] = Batcher(function, self.max_batch_size, self.timeout_s)
        return batcher(inputs)
