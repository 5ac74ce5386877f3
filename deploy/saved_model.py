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

from google.protobuf.message import DecodeError

from kcp.core import storage
from kcp.core.errors import UserError


class ExportUnreadable(UserError):
    """An export version that cannot be loaded (damaged, truncated, missing files)."""


def _unreadable(path: str, error: Exception) -> UserError:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return ExportUnreadable(f"{path}: cannot load the SavedModel ({first[:300]}); export it again")


def load_export(path: str):
    """What `tf.saved_model.load(path)` gives, for any export of this project; a damaged or
    missing export is a one-line UserError naming it."""
    try:
        return tf.saved_model.load(path)
    except (OSError, ValueError, IndexError, DecodeError, tf.errors.OpError) as error:  # IndexError: a truncated
        raise _unreadable(path, error) from error  # variables file ("Read less bytes than requested")


def signature_defs(path: str, internal: bool = False) -> dict:
    """{signature name: SignatureDef} of an export, read from its saved_model.pb without loading it;
    with `internal`, TensorFlow's own (`__saved_model_init_op`) too, as TF Serving's metadata lists them."""
    try:
        saved = saved_model_pb2.SavedModel.FromString(storage.read_bytes(storage.join(path, "saved_model.pb")))
    except DecodeError as error:
        raise _unreadable(path, error) from error
    return {name: signature for name, signature in saved.meta_graphs[0].signature_def.items()
            if internal or not name.startswith("__")}
