"""What a version folder and the command line say about serving it: the version policy,
labels, kcp validate's blessing, and TF Serving's warmup records."""

from __future__ import annotations

import json
import os

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from kcp.core import storage
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


def parse_labels(pairs) -> dict[str, int]:
    """['stable=3', 'canary=4'] -> {'stable': 3, 'canary': 4}."""
    labels = {}
    for pair in pairs or ():
        label, _, version = pair.partition("=")
        if not label or not version.isdigit() or label.isdigit():
            raise UserError(f"--version-label {pair!r}: use LABEL=VERSION, e.g. stable=3")
        labels[label] = int(version)
    return labels


def blessed(path: str) -> bool:
    verdict = storage.join(path, "assets.extra", "validation.json")
    try:
        return storage.exists(verdict) and json.loads(storage.read_text(verdict)).get("blessed") is True
    except (OSError, ValueError, AttributeError):
        return False


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
