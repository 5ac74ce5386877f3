"""Loading an export, with the ops its graph may use registered first.

A `data.tokenizer: bpe` language model tokenizes inside its `generate` and `score` signatures
with keras_hub's BytePairTokenizer, whose graph holds TensorFlow Text ops (RegexSplitWithOffsets).
`tf.saved_model.load` in a process that never imported `tensorflow_text` fails with "Op type not
registered", so every loader in this project goes through `load_export`. (TensorFlow Serving
needs a model server built with TensorFlow Text's ops for such an export: tensorflow/serving#1490.)
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_text  # noqa: F401  registers TensorFlow Text's ops (0.2 s once TensorFlow is imported)
from tensorflow.core.protobuf import saved_model_pb2

from kcp.core import storage


def load_export(path: str):
    """What `tf.saved_model.load(path)` gives, for any export of this project."""
    return tf.saved_model.load(path)


def signature_defs(path: str) -> dict:
    """{signature name: SignatureDef} of an export, read from its saved_model.pb without loading it."""
    saved = saved_model_pb2.SavedModel.FromString(storage.read_bytes(storage.join(path, "saved_model.pb")))
    return {name: signature for name, signature in saved.meta_graphs[0].signature_def.items()
            if not name.startswith("__")}
