"""The model registry: one family per module, looked up by `model.name`.

    model = build_model(ModelInputs.from_contract(contract), config.model)

Each family module holds its config dataclass (registered with `@model_family`, so the
config loader validates the family's keys) and its `build(spec, config)`. A new family is
one new module plus its line here.

The family modules import Keras inside their builders, not at the top: every command
validates its config, and so imports this registry, before any work; importing Keras takes
about 5 s on 2 cores (measured) and TensorFlow prints its start-up lines, which must not
delay or bury a one-line config error.
"""

from __future__ import annotations

from kcp.core.config import ModelConfig  # noqa: F401  re-exported
from kcp.core.families import MODEL_FAMILIES, check_family_takes, families_for  # noqa: F401  re-exported
from trainer.models import cnn, gpt, resnet, rnn, transformer
from trainer.models.common import ModelInputs

REGISTRY = {
    "cnn": cnn.build,
    "gpt": gpt.build,
    "resnet": resnet.build,
    "rnn": rnn.build,
    "transformer": transformer.build,
}


def build_model(spec: ModelInputs, config: ModelConfig):
    """Builds the functional Keras model of family `config.name` for `spec`."""
    try:
        builder = REGISTRY[config.name]
    except KeyError:
        raise ValueError(f"model.name: {config.name!r} is not one of {', '.join(REGISTRY)}") from None
    check_family_takes(config.name, spec.modality)
    return builder(spec, config)


def register_custom_layers() -> None:
    """Registers every kcp layer (package `kcp`) with Keras, so that `keras.saving.load_model` reads
    any RUN/train/model.keras in a fresh process:

        import keras, trainer.models
        trainer.models.register_custom_layers()
        model = keras.saving.load_model("runs/digits/train/model.keras")
    """
    from trainer import language_metrics  # noqa: F401  NatsPerToken, the metric a gpt model.keras is compiled with
    from trainer.models import layers  # noqa: F401  registers on import (WordDropout, BidirectionalRNN, ...)

    gpt.layer_classes()  # the gpt family's, defined and registered on the first call
