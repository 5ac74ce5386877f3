"""Custom layers with state, registered for `.keras` loading under the package name `kcp`.

Import this module before `keras.saving.load_model` on a model that may contain them
(the exporter does); everything else in the zoo is built from stock Keras layers.
"""

from __future__ import annotations

import keras
import numpy as np


def sinusoidal_table(tokens: int, dim: int) -> np.ndarray:
    """The (tokens, dim) sine/cosine table of Vaswani et al. 2017."""
    positions = np.arange(tokens)[:, None]
    rates = 1.0 / np.power(10000.0, (2 * (np.arange(dim) // 2)) / dim)
    angles = positions * rates[None, :]
    table = np.zeros((tokens, dim), dtype=np.float32)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table


@keras.saving.register_keras_serializable(package="kcp")
class PositionEncoding(keras.layers.Layer):
    """Adds a position code to (batch, tokens, dim): fixed sinusoids or a learned table."""

    def __init__(self, kind: str = "sinusoidal", **kwargs):
        super().__init__(**kwargs)
        if kind not in ("sinusoidal", "learned"):
            raise ValueError(f"model.positional: {kind!r} is not one of sinusoidal, learned")
        self.kind = kind

    def build(self, input_shape):
        tokens, dim = int(input_shape[-2]), int(input_shape[-1])
        if self.kind == "learned":
            self.table = self.add_weight(shape=(tokens, dim), name="table",
                                         initializer=keras.initializers.RandomNormal(stddev=0.02))
        else:
            self.table = sinusoidal_table(tokens, dim)

    def call(self, x):
        return x + keras.ops.cast(self.table, x.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


@keras.saving.register_keras_serializable(package="kcp")
class ClassToken(keras.layers.Layer):
    """Prepends one learned token: (batch, tokens, dim) -> (batch, tokens + 1, dim)."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, int(input_shape[-1])), initializer="zeros", name="token")

    def call(self, x):
        batch = keras.ops.shape(x)[0]
        token = keras.ops.broadcast_to(keras.ops.cast(self.token, x.dtype), (batch, 1, x.shape[-1]))
        return keras.ops.concatenate([token, x], axis=1)

    def compute_output_shape(self, input_shape):
        tokens = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], tokens, input_shape[2])


@keras.saving.register_keras_serializable(package="kcp")
class MaskedAveragePooling(keras.layers.Layer):
    """Mean of the real tokens: [(batch, tokens, dim), (batch, tokens) bool] -> (batch, dim).

    A row with no real token (a text that tokenizes to nothing) pools to zeros. Keras'
    GlobalAveragePooling1D divides 0 by 0 there, and one NaN row poisons every weight.
    """

    def call(self, inputs):
        x, padding = inputs  # padding: True where a token is real
        real = keras.ops.expand_dims(keras.ops.cast(padding, x.dtype), -1)  # (batch, tokens, 1)
        total = keras.ops.sum(keras.ops.where(real > 0, x, keras.ops.zeros_like(x)), axis=1)
        count = keras.ops.sum(real, axis=1)  # (batch, 1)
        return total / keras.ops.maximum(count, keras.ops.ones_like(count))

    def compute_output_shape(self, input_shape):
        shape = input_shape[0]
        return (shape[0], shape[2])


# The gpt family's layers (TiedEmbedding, PositionEmbedding, DecoderBlock) are defined by
# trainer/models/gpt.py on first use, since a family module must not import Keras at the top
# (trainer/models/__init__.py). Defining them here registers them for everything that loads
# a model.keras through this module: the exporter, the report, batch prediction.
from trainer.models.gpt import layer_classes as _gpt_layer_classes  # noqa: E402

_gpt_layer_classes()
