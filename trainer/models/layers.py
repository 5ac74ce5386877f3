"""Custom layers with state, registered for `.keras` loading under the package name `kcp`.

Import this module before `keras.saving.load_model` on a model that may contain them
(the exporter does); everything else in the zoo is built from stock Keras layers.
"""

from __future__ import annotations

import keras
import numpy as np

from trainer.models.common import CELLS  # model.cell -> its Keras layer
from trainer.models.word_dropout import WordDropout  # noqa: F401  (registered here too, for load_model)


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
    A Keras mask on `x` (an rnn's steps) is consumed, not passed on: the output has no time axis.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def compute_mask(self, inputs, mask=None):
        return None

    def call(self, inputs):
        x, padding = inputs  # padding: True where a token is real
        real = keras.ops.expand_dims(keras.ops.cast(padding, x.dtype), -1)  # (batch, tokens, 1)
        total = keras.ops.sum(keras.ops.where(real > 0, x, keras.ops.zeros_like(x)), axis=1)
        count = keras.ops.sum(real, axis=1)  # (batch, 1)
        return total / keras.ops.maximum(count, keras.ops.ones_like(count))

    def compute_output_shape(self, input_shape):
        shape = input_shape[0]
        return (shape[0], shape[2])


@keras.saving.register_keras_serializable(package="kcp")
class BidirectionalRNN(keras.layers.Layer):
    """A recurrent layer read forwards and a copy read backwards, outputs concatenated:
    (batch, time, features) -> (batch, 2 * units), or (batch, time, 2 * units) with
    `return_sequences` (the backward outputs flipped back into time order).

    What `keras.layers.Bidirectional(layer)` computes (same weights, same order: forward, then
    backward; tested), built from the cell's own Keras layer twice. Keras' wrapper copies its
    layer through `serialize_keras_object`, which imports TensorFlow under the JAX backend.
    A padding mask reaches both directions: padded steps keep the state, so the backward layer
    starts at the last real step; with `return_sequences` the padded steps output zeros.
    """

    def __init__(self, cell: str = "gru", units: int = 128, return_sequences: bool = False,
                 kernel_initializer: str = "glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if cell not in CELLS:
            raise ValueError(f"model.cell: {cell!r} is not one of {', '.join(CELLS)}")
        self.cell, self.units, self.return_sequences = cell, int(units), bool(return_sequences)
        self.kernel_initializer = kernel_initializer  # a name (model.initializer)
        layer_class = getattr(keras.layers, CELLS[cell])
        options = dict(return_sequences=self.return_sequences, kernel_initializer=self.kernel_initializer)
        if self.return_sequences:  # as Keras' Bidirectional: padded steps output zeros in both directions
            options["zero_output_for_mask"] = True
        self.forward_layer = layer_class(units, name=f"forward_{CELLS[cell].lower()}", **options)
        self.backward_layer = layer_class(units, go_backwards=True, name=f"backward_{CELLS[cell].lower()}",
                                          **options)
        self.supports_masking = True

    def build(self, input_shape):
        self.forward_layer.build(input_shape)
        self.backward_layer.build(input_shape)

    def call(self, x, mask=None, training=None):
        forward = self.forward_layer(x, mask=mask, training=training)  # (batch, [time,] units)
        backward = self.backward_layer(x, mask=mask, training=training)  # time reversed when sequences
        if self.return_sequences:
            backward = keras.ops.flip(backward, axis=1)
        return keras.ops.concatenate([forward, keras.ops.cast(backward, forward.dtype)], axis=-1)

    def compute_mask(self, x, mask=None):
        return mask if self.return_sequences else None

    def compute_output_shape(self, input_shape):
        if self.return_sequences:
            return (input_shape[0], input_shape[1], 2 * self.units)
        return (input_shape[0], 2 * self.units)

    def get_config(self):
        return {**super().get_config(), "cell": self.cell, "units": self.units,
                "return_sequences": self.return_sequences,
                "kernel_initializer": self.kernel_initializer}


# The gpt family's layers (TiedEmbedding, PositionEmbedding, DecoderBlock) are defined by
# trainer/models/gpt.py on first use, since a family module must not import Keras at the top
# (trainer/models/__init__.py). Defining them here registers them for everything that loads
# a model.keras through this module: the exporter, the report, batch prediction.
from trainer.models.gpt import layer_classes as _gpt_layer_classes  # noqa: E402

_gpt_layer_classes()
