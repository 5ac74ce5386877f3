"""What a version folder and the command line say about serving it: the version policy,
labels, TF Serving's warmup records (kcp validate's blessing: kcp.core.layout.is_blessed), and a
loaded version."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_log_pb2

from deploy.saved_model import signature_defs
from deploy.serving.codec import UnknownSignature
from kcp.core.errors import UserError

WARMUP_RECORDS = 10  # of the export's 100: enough to trace every signature call once


def parse_policy(text: str) -> tuple[str, object]:
    """'latest' / 'latest:N' / 'all' / 'specific:1,3' -> (kind, N or set of versions)."""
    kind, _, argument = (text or "latest:1").partition(":")
    try:
        if kind == "latest":
            count = int(argument or 1)
            if count >= 1:
                return "latest", count
        elif kind == "all" and not argument:
            return "all", None
        elif kind == "specific" and argument:
            return "specific", {int(v) for v in argument.split(",")}
    except ValueError:
        pass
    raise UserError(f"--version-policy {text!r}: use latest, latest:N, all or specific:V1,V2")


def parse_labels(labels) -> dict[tuple[str | None, str], int]:
    """['stable=3', 'digits:canary=4'] (or {'stable': 3, 'digits:canary': 4}) -> {(None, 'stable'): 3,
    ('digits', 'canary'): 4}: a label of every model name (None), or of one (NAME:LABEL, as TF Serving's
    labels are per model)."""
    if isinstance(labels, str):
        labels = [labels]
    items = labels.items() if isinstance(labels, dict) else (str(pair).partition("=")[::2] for pair in labels or ())
    parsed = {}
    for key, version in items:
        key, version = str(key), str(version)
        name, _, label = key.rpartition(":")
        if (not label or label.isdigit() or not version.isdigit() or "/" in key or key.startswith(":")
                or ":" in name):
            raise UserError(f"--version-label {f'{key}={version}'!r}: use LABEL=VERSION or NAME:LABEL=VERSION, "
                            "e.g. stable=3")
        parsed[(name or None, label)] = int(version)
    return parsed


def replay_warmup(model, path: str, limit: int = WARMUP_RECORDS) -> None:
    """Replays the export's assets.extra/tf_serving_warmup_requests (PredictLog records) as TF
    Serving does when a version loads, so the first client does not pay for tracing; a record
    the model rejects fails the load, as there."""
    records = os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
    if not os.path.exists(records):
        return
    for record in tf.data.TFRecordDataset(records).take(limit):
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if entry.HasField("predict_log"):
            request = entry.predict_log.request
            function = model.signatures[request.model_spec.signature_name or "serving_default"]
            function(**{name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()})


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

    def unload(self) -> None:
        """Ends its batching threads (calls already queued still run); the model goes with the last reference."""
        for batcher in self.batchers.values():
            batcher.close()

    @cached_property
    def signature_def_map(self) -> get_model_metadata_pb2.SignatureDefMap:
        """The export's SignatureDefs as saved (tensor names, method names): what metadata answers."""
        signature_def_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in signature_defs(self.path, internal=True).items():
            signature_def_map.signature_def[name].CopyFrom(signature_def)
        return signature_def_map

    def signature(self, name: str):
        """The concrete function of signature `name`, or a 400 naming the ones there are (TF Serving's words)."""
        function = self.model.signatures.get(name or "serving_default")
        if function is None:
            raise UnknownSignature(name)
        return function
