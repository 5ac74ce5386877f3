"""Plain convolutional networks: Conv2D for images, Conv1D for sequences and for text.

Each block is `convs_per_block` x (conv -> batch norm -> ReLU), then 2x max pooling while
the spatial size allows it; a global average pool and a softmax head close the model.
Text is embedded first (`model.dim` per token), then convolved along time.

    kcp describe-model --model cnn --set model.filters=[32,64,128] --input-shape 32,32,3 --num-classes 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from kcp.core.config import ConfigError, ModelConfig, model_family, option
from trainer.models.common import (ModelInputs, batch_norm, classifier_head, initializer_for, model_input,
                                   token_embedding)


@model_family("cnn")
@dataclass(frozen=True)
class CNNConfig:
    """The cnn family's own keys (`model.filters`, ...)."""

    filters: tuple = option((32, 64), help="filters per convolution block")
    kernel_size: int = option(3, minimum=1, help="kernel size")
    convs_per_block: int = option(2, minimum=1, help="convolutions per block")
    batch_norm: bool = option(True, help="batch normalization after each convolution")
    dim: int = option(64, minimum=1, help="text: embedding size")

    default_initializer: ClassVar[str] = "he_normal"  # ReLU networks
    modalities: ClassVar[tuple] = ("image", "sequence", "text")  # the data it takes (build_model refuses the rest)
    search_space: ClassVar[dict] = {
        "model.kernel_size": [3, 5], "model.dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
        "train.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}}

    def __post_init__(self):
        if not self.filters:
            raise ConfigError("model.filters: must list at least one block's filter count")


def conv_block(x, filters: int, kernel_size: int, *, rank: int, convs: int, config: ModelConfig,
               initializer: str, name: str):
    """`convs` convolutions of `filters` channels; layer names `{name}_conv{i}`, `{name}_bn{i}`."""
    import keras

    conv = keras.layers.Conv2D if rank == 2 else keras.layers.Conv1D
    for index in range(1, convs + 1):
        x = conv(filters, kernel_size, padding="same", use_bias=not config.batch_norm,
                 kernel_initializer=initializer, name=f"{name}_conv{index}")(x)
        if config.batch_norm:
            x = batch_norm(x, config, f"{name}_bn{index}")
        x = keras.layers.Activation("relu", name=f"{name}_relu{index}")(x)
    return x


def build(spec: ModelInputs, config: ModelConfig):
    """Builds the CNN for an image ([H, W, C]), sequence ([T, F]) or text ([T] token ids) input."""
    import keras

    inputs, x = model_input(spec, config)
    if spec.modality == "text":
        x = token_embedding(x, spec, config.dim, mask_zero=False,  # Conv1D has no mask support
                            word_dropout=config.word_dropout)
    rank = 2 if spec.modality == "image" else 1
    pool = keras.layers.MaxPooling2D if rank == 2 else keras.layers.MaxPooling1D
    spatial = min(spec.shape[:rank])
    initializer = initializer_for(config)
    for index, filters in enumerate(config.filters, start=1):
        x = conv_block(x, int(filters), config.kernel_size, rank=rank, convs=config.convs_per_block,
                       config=config, initializer=initializer, name=f"block{index}")
        if spatial >= 4 and index < len(config.filters):  # keep at least 2 positions for the last block
            x = pool(2, name=f"block{index}_pool")(x)
            spatial //= 2
    global_pool = keras.layers.GlobalAveragePooling2D if rank == 2 else keras.layers.GlobalAveragePooling1D
    outputs = classifier_head(global_pool(name="avg_pool")(x), spec.num_classes, config.dropout)
    return keras.Model(inputs, outputs, name=f"cnn{rank}d")
