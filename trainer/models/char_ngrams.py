"""The character n-gram bag of the text classifiers (`data.char_ngrams`, `model.char_ngram_dim`): the
text's hashed character 1..N-grams, after its token ids in the one input tensor, embedded, averaged,
normalized and joined to a family's pooled features before the head. A module of its own because it
builds layers.py's MaskedAveragePooling and layers.py imports common.py."""

from __future__ import annotations

from kcp.core.config import ModelConfig
from trainer.models.common import ModelInputs


def with_char_ngrams(x, inputs, spec: ModelInputs, config: ModelConfig):
    """The family's pooled features `x`, joined by the mean of the text's character n-gram embeddings
    (`model.char_ngram_dim` each; fastText's bag of subwords) when the input has them; `x` otherwise.

    A linear model over character n-grams is strong on short lines, code and identifiers, where
    one `#include`, `":` or product-code prefix decides the class, and no word vocabulary holds it.
    Layers `char_ngram_embedding`, `char_ngram_pool`, `char_ngram_norm`, `with_char_ngrams`."""
    import keras
    from keras import ops
    from trainer.models.layers import MaskedAveragePooling  # Keras: imported when a model is built

    if not spec.char_ngram_length:
        return x
    grams = inputs[:, spec.shape[0]:]
    embedded = keras.layers.Embedding(spec.char_ngram_buckets, config.char_ngram_dim,
                                      name="char_ngram_embedding")(grams)
    bag = MaskedAveragePooling(name="char_ngram_pool")([embedded, ops.not_equal(grams, 0)])
    # The mean of a few hundred small embeddings is small beside the family's features, and the family fits
    # the training set first; normalized, the bag weighs as much from the start (docs/performance.md round 9).
    bag = keras.layers.LayerNormalization(name="char_ngram_norm")(bag)
    return keras.layers.Concatenate(name="with_char_ngrams")([x, bag])
