"""What every model family shares: the input spec taken from the contract, the input
normalisation with the pipeline's statistics, and the classifier head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelInputs:
    """The part of the data contract a model builder needs."""

    modality: str  # image | sequence
    shape: tuple  # one example, e.g. (8, 8, 1)
    num_classes: int
    mean: tuple = ()  # per channel (images) or per feature (sequences); empty: no normalisation
    std: tuple = ()
    input_name: str = "image"

    @classmethod
    def from_contract(cls, contract) -> "ModelInputs":
        return cls(
            modality=contract.modality,
            shape=tuple(contract.input_shape),
            num_classes=contract.num_classes,
            mean=tuple(contract.statistics.get("mean", ())),
            std=tuple(contract.statistics.get("std", ())),
            input_name=contract.input_feature,
        )


def normalized_input(spec: ModelInputs):
    """The model's Input and the input normalised with the pipeline's mean/std.

    The statistics are fixed at construction (never adapted here), so training and serving
    use exactly the numbers the pipeline measured. Returns (inputs, normalised tensor).
    """
    import keras

    inputs = keras.Input(shape=spec.shape, dtype="float32", name=spec.input_name)
    if not spec.mean:
        return inputs, inputs
    variance = np.square(np.asarray(spec.std, dtype=np.float64))
    normalized = keras.layers.Normalization(
        axis=-1, mean=list(spec.mean), variance=list(variance), name="normalize")(inputs)
    return inputs, normalized


def classifier_head(x, num_classes: int, dropout: float, initializer: str = "glorot_uniform"):
    """Dropout, then a softmax Dense layer named `predictions`."""
    import keras

    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    return keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=initializer,
                              name="predictions")(x)
