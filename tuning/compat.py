"""Work-arounds for Keras Tuner bugs: each one small, linked, and tested to fail without it."""

from __future__ import annotations

import json

from keras_tuner.src import utils as kt_utils

from kcp.core import storage

_PATCHED = set()


def patch_keras_tuner_atomic_json() -> bool:
    """Makes Keras Tuner write trial.json and oracle.json atomically; returns True once patched.

    keras-tuner 1.4.x (`keras_tuner.src.utils.save_json`) truncates the file and then
    writes it, so a tuner killed in between (preemption, OOM kill) leaves an empty
    trial.json, and every later resume fails in `Oracle.reload` with
    "JSONDecodeError: Expecting value: line 1 column 1". Writing a temporary file and
    renaming it over the old one leaves either the old state or the new one.
    """
    if "keras-tuner-atomic-json" in _PATCHED:
        return True

    def save_json(path, obj):
        text = json.dumps(obj)
        storage.write_text_atomic(str(path), text)
        return text

    kt_utils.save_json = save_json
    _PATCHED.add("keras-tuner-atomic-json")
    return True
