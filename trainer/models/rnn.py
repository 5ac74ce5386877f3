"""Recurrent networks: SimpleRNN, LSTM or GRU cells, stacked, bidirectional by default.

Sequences are read as they are ([T, F]); images row by row (H time steps of W*C values);
text through an embedding that masks padding (id 0), so padded steps never update state.

    kcp describe-model --model rnn --set model.cell=lstm --set model.bidirectional=true --input-shape 28,28,1 --num-classes 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from kcp.core.config import ModelConfig, model_family, option
from trainer.models.common import CELLS, ModelInputs, classifier_head, initializer_for, model_input, token_embedding


@model_family("rnn")
@dataclass(frozen=True)
class RNNConfig:
    """The rnn family's own keys (`model.cell`, ...)."""

    # GRU: measured against LSTM with the rest of the defaults (docs/performance.md): digits 0.959 ->
    # 0.979, shape-under-shift sequences 0.718 -> 0.787, text lines 0.488 -> 0.484, and faster.
    # Bidirectional (both directions of every layer, BidirectionalRNN): sequences 0.787 -> 0.897,
    # text lines 0.484 -> 0.516, digits level (0.979); about 1.6x the time.
    cell: str = option("gru", choices=tuple(CELLS), help="recurrent cell")
    units: int = option(128, minimum=1, help="units per layer")
    layers: int = option(2, minimum=1, help="stacked recurrent layers")
    bidirectional: bool = option(True, help="each layer reads forwards and backwards (sequences: 0.787 -> 0.897)")
    dim: int = option(64, minimum=1, help="text: embedding size")

    default_initializer: ClassVar[str] = "glorot_uniform"
    modalities: ClassVar[tuple] = ("image", "sequence", "text")  # the data it takes (build_model refuses the rest)
    search_space: ClassVar[dict] = {
        "model.cell": ["lstm", "gru"], "model.units": [64, 128], "model.bidirectional": [False, True],
        "train.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}}


def recurrent_layer(x, cell: str, units: int, *, return_sequences: bool, bidirectional: bool,
                    initializer: str, name: str):
    """One recurrent layer `{name}`, or `{name}_bidirectional` (a forward and a backward copy,
    `BidirectionalRNN`: Keras' own `Bidirectional` imports TensorFlow under the JAX backend)."""
    import keras
    from trainer.models.layers import BidirectionalRNN

    if bidirectional:
        return BidirectionalRNN(cell, units, return_sequences=return_sequences, kernel_initializer=initializer,
                                name=f"{name}_bidirectional")(x)
    layer = getattr(keras.layers, CELLS[cell])(units, return_sequences=return_sequences,
                                                kernel_initializer=initializer, name=name)
    return layer(x)


def build(spec: ModelInputs, config: ModelConfig):
    """Builds `model.layers` stacked `model.cell` layers of `model.units` and a softmax head."""
    import keras

    inputs, x = model_input(spec, config)
    if spec.modality == "image":
        height, width, channels = spec.shape
        x = keras.layers.Reshape((height, width * channels), name="rows_as_steps")(x)  # (batch, H, W*C)
    elif spec.modality == "text":
        x = token_embedding(x, spec, config.dim, mask_zero=True)
    initializer = initializer_for(config)
    for index in range(1, config.layers + 1):
        x = recurrent_layer(x, config.cell, config.units, return_sequences=index < config.layers,
                            bidirectional=config.bidirectional, initializer=initializer, name=f"rnn{index}")
    outputs = classifier_head(x, spec.num_classes, config.dropout)
    return keras.Model(inputs, outputs, name=f"{config.cell}{config.layers}")
