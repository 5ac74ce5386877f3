"""The model registry: one family per module, looked up by `model.name`.

    model = build_model(ModelInputs.from_contract(contract), config.model)
"""

from __future__ import annotations

from kcp.core.config import ModelConfig
from trainer.models import cnn, resnet, rnn, transformer
from trainer.models.common import ModelInputs

REGISTRY = {
    "cnn": cnn.build,
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
    return builder(spec, config)
