"""Language-model metrics: nats per target token (padding left out), perplexity and bits per byte.

Bits per byte compare across tokenizers: the summed loss of a split over the bytes its target
tokens encode (the data contract's `target_bytes`; each bpe token counts its own bytes), in bits.
"""

from __future__ import annotations

import math

import keras

from kcp.core import contract as contract_lib


@keras.saving.register_keras_serializable(package="kcp")
class NatsPerToken(keras.metrics.Metric):
    """Cross-entropy in nats per target token, padding (LANGUAGE_PAD) left out: the sum over
    every real token of the epoch divided by their count, so unlike the loss (a mean of per-batch
    means) it does not depend on how padding falls into batches. From logits."""

    def __init__(self, name: str = "nats_per_token", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float64", aggregation="sum",
                                       name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float64", aggregation="sum",
                                       name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        targets = keras.ops.cast(y_true, "int32")
        real = keras.ops.not_equal(targets, contract_lib.LANGUAGE_PAD)
        losses = keras.ops.sparse_categorical_crossentropy(targets, keras.ops.cast(y_pred, "float32"), from_logits=True)
        losses = keras.ops.where(real, losses, keras.ops.zeros_like(losses))
        self.total.assign_add(keras.ops.cast(keras.ops.sum(losses), "float64"))
        self.count.assign_add(keras.ops.cast(keras.ops.sum(keras.ops.cast(real, "int32")), "float64"))

    def result(self):
        return keras.ops.cast(keras.ops.divide_no_nan(self.total, self.count), "float32")


def language_split_metrics(nats_per_token: float, contract, splits) -> dict:
    """perplexity and bits_per_byte of a split (or several fitted as one) from its nats per token."""
    return {"perplexity": float(math.exp(min(nats_per_token, 700.0))),
            "bits_per_byte": bits_per_byte(nats_per_token, contract, splits)}


def bits_per_byte(nats_per_token: float, contract, splits) -> float:
    """Bits per byte of the text behind `splits` (a name or a list): nats/token x tokens/bytes / ln 2."""
    names = [splits] if isinstance(splits, str) else list(splits)
    if len(names) == 1:
        return float(contract_lib.bits_per_byte(nats_per_token, contract, names[0]))
    # several splits fitted as one: the token-weighted mean of each split's conversion
    statistics = contract.statistics
    encoded = statistics.get("target_bytes", statistics["bytes"])
    nats = nats_per_token * sum(statistics["tokens"][name] for name in names)
    return float(nats / math.log(2) / sum(encoded[name] for name in names))
