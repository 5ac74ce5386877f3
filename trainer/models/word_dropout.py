"""The `WordDropout` layer of the text classifiers (`model.word_dropout`), registered for `.keras`
loading under the package name `kcp` (layers.py imports it, so importing layers.py registers every
custom layer). A module of its own because trainer/models/common.py builds it and layers.py imports
common.py."""

from __future__ import annotations

import keras

from kcp.core.contract import RESERVED_TOKEN_IDS  # text ids: 0 padding, 1 out of vocabulary, then tokens

UNKNOWN_ID = RESERVED_TOKEN_IDS - 1  # what TextVectorization gives a token outside the vocabulary


@keras.saving.register_keras_serializable(package="kcp")
class WordDropout(keras.layers.Layer):
    """Word dropout (Iyyer et al. 2015; Bowman et al. 2016, who replace the word with the unknown
    token): in training, each real token id (2 and up) becomes the out-of-vocabulary id 1 with
    probability `rate`; padding (0) and out-of-vocabulary ids stay. Outside training, the identity.

    The train split has no unknown words but rare ones (`data.min_count`), while new text has many
    (a tenth of the test tokens of bench/modality_zoo.py's text lines): the model learns to classify
    around them instead of leaning on any single token.
    """

    def __init__(self, rate: float, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"model.word_dropout: {rate} is not in [0, 1)")
        self.rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, ids, training=None):
        if not training or self.rate == 0.0:
            return ids
        dropped = keras.random.uniform(keras.ops.shape(ids), seed=self.seed_generator) < self.rate
        return keras.ops.where(dropped & (ids >= RESERVED_TOKEN_IDS), keras.ops.full_like(ids, UNKNOWN_ID), ids)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
