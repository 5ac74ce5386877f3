"""Recurrent networks: SimpleRNN, LSTM or GRU cells, stacked, bidirectional by default.

Sequences are read as they are ([T, F]); images row by row (H time steps of W*C values), images
of more than 8 rows by default after convolution blocks that halve them to 8 rows (`model.image_stem:
conv`, as CRNN, Shi et al. 2015: 32x32 colour glyphs 0.689 -> 0.879, docs/performance.md round 8);
text through an embedding that masks padding (id 0), so padded steps never update state. On text
the head reads the last state, or (`model.pooling`) the max, or max and mean, over the real steps.

    kcp describe-model --model rnn --set model.cell=lstm --set model.bidirectional=true --input-shape 28,28,1 --num-classes 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from kcp.core.config import ModelConfig, option
from kcp.core.families import model_family
from trainer.models.char_ngrams import with_char_ngrams
from trainer.models.common import (CELLS, ModelInputs, classifier_head, conv_pool_block, initializer_for,
                                   model_input, token_embedding)

POOLINGS = ("last", "max", "max_mean")
STEM_ROWS = 8  # the conv image stem halves an image until it has at most this many rows


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
    # Text lines (docs/performance.md, seeds 42 and 1): neither key moved the test accuracy off 0.77
    # (0.3 dropout 0.758; max pool 0.782 / 0.766; max_mean 0.774 / 0.770), so both stay off by default.
    embedding_dropout: float = option(0.0, minimum=0.0, maximum=0.95, help="text: dropout after the embedding")
    image_stem: str = option("conv", choices=("rows", "conv"),
                             help="images: read the pixel rows, or (conv) the rows of 3x3 convolution blocks that "
                                  "halve an image of more than 8 rows down to 8")
    pooling: str = option("last", choices=POOLINGS,
                          help="text: the head reads the last state, or the max (max_mean: and the mean) "
                               "of the last layer's real steps")

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


def stem_filters(spec: ModelInputs, image_stem: str) -> list:
    """The filters of the conv image stem's blocks: one per halving of the image's height down to
    STEM_ROWS, 32 doubling per block; none for images of 8 rows or fewer (the digits: rows as before)."""
    if spec.modality != "image" or image_stem != "conv":
        return []
    filters, height = [], spec.shape[0]
    while height > STEM_ROWS:
        filters.append(32 * 2 ** len(filters))
        height = -(-height // 2)
    return filters


def masked_time_pool(x, padding, pooling: str):
    """(batch, time, features) -> (batch, features): the max over the real steps (`max`), or the max
    and the mean concatenated (`max_mean`). Padding (`padding` False) never enters either, and a row
    with no real step pools to zeros (not -inf: one such row would poison every weight)."""
    from keras import ops

    real = ops.expand_dims(padding, -1)  # (batch, time, 1)
    lowest = ops.min(x, axis=1, keepdims=True)  # padded steps output zeros, and every real output may be below 0
    peak = ops.max(ops.where(real, x, lowest), axis=1)  # (batch, features)
    pooled = ops.where(ops.any(real, axis=1), peak, ops.zeros_like(peak))
    if pooling == "max_mean":
        from trainer.models.layers import MaskedAveragePooling

        pooled = ops.concatenate([pooled, MaskedAveragePooling()([x, padding])], axis=-1)
    return pooled


def build(spec: ModelInputs, config: ModelConfig):
    """Builds `model.layers` stacked `model.cell` layers of `model.units` and a softmax head."""
    import keras
    from keras import ops

    inputs, x = model_input(spec, config)
    padding = None  # (batch, time) True where a token is real; text only
    if spec.modality == "image":
        for index, filters in enumerate(stem_filters(spec, config.image_stem), start=1):  # (batch, H, W, C) halved
            x = conv_pool_block(x, filters, config, f"stem{index}")
        height, width, channels = x.shape[1:]
        x = keras.layers.Reshape((height, width * channels), name="rows_as_steps")(x)  # (batch, H, W*C)
    elif spec.modality == "text":
        padding = ops.not_equal(x, 0)
        x = token_embedding(x, spec, config.dim, mask_zero=True, dropout=config.embedding_dropout,
                            word_dropout=config.word_dropout)
    pool = padding is not None and config.pooling != "last"
    initializer = initializer_for(config)
    for index in range(1, config.layers + 1):
        x = recurrent_layer(x, config.cell, config.units, return_sequences=pool or index < config.layers,
                            bidirectional=config.bidirectional, initializer=initializer, name=f"rnn{index}")
    if pool:
        x = masked_time_pool(x, padding, config.pooling)  # (batch, features) or (batch, 2 * features)
    outputs = classifier_head(with_char_ngrams(x, inputs, spec, config), spec.num_classes, config.dropout_rate)
    return keras.Model(inputs, outputs, name=f"{config.cell}{config.layers}")
