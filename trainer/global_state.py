"""The process-global state that training changes, and giving a caller (a notebook) it back.

Training sets Keras' global dtype policy (`train.precision`) and seeds Python's `random`,
NumPy, Keras' global seed and TensorFlow's global seed (`train.seed`, through
`keras.utils.set_random_seed`). The Python API wraps train and tune in `caller_state_kept`.
Keras' and TensorFlow's seeds are not public state: they are read from `keras.src` and
`tensorflow.python.eager.context`, as `keras.utils.set_random_seed` itself sets them.
"""

from __future__ import annotations

import contextlib
import random
import sys

import keras
import numpy as np
from keras.src.backend.common import global_state


@contextlib.contextmanager
def caller_state_kept():
    """Gives the caller back the dtype policy, the four seeds (and the draws' places in their
    sequences) and TensorFlow's op determinism as they were: a notebook that builds its own layers
    or draws its own numbers after training must not inherit train.precision, train.seed or
    train.deterministic (under which an unseeded tf.random op raises)."""
    keras_keys = ("global_random_seed", "global_seed_generator")
    saved = (keras.config.dtype_policy(), random.getstate(), np.random.get_state(),
             [global_state.get_global_attribute(key) for key in keras_keys])
    tf_saved, determinism = None, False  # TensorFlow not imported yet: op determinism is off
    if "tensorflow" in sys.modules:  # imported by whoever trains; its eager seed and op-seed sequence
        from tensorflow.python.eager import context
        from tensorflow.python.framework import config as tf_config

        rng = getattr(context.context(), "_rng", None)  # made by the first tf.random.set_seed
        tf_saved = (context.global_seed(), rng.getstate() if rng is not None else None)
        determinism = tf_config.is_op_determinism_enabled()
    try:
        yield
    finally:
        if "tensorflow" in sys.modules:  # train.deterministic turns op determinism on for the process
            from tensorflow.python.framework import config as tf_config

            if tf_config.is_op_determinism_enabled() != determinism:  # (no public call turns it off)
                (tf_config.enable_op_determinism if determinism else tf_config.disable_op_determinism)()
        policy, python_state, numpy_state, keras_values = saved
        keras.config.set_dtype_policy(policy)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for key, value in zip(keras_keys, keras_values):
            global_state.set_global_attribute(key, value)
        if tf_saved is not None:
            import tensorflow as tf
            from tensorflow.python.eager import context

            tf.random.set_seed(tf_saved[0])
            rng = getattr(context.context(), "_rng", None)
            if tf_saved[1] is not None and rng is not None:
                rng.setstate(tf_saved[1])
