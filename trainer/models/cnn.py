"""Plain convolutional networks: Conv2D for images, Conv1D for sequences and for text.

Each block is `convs_per_block` x (conv -> batch norm -> ReLU), then 2x max pooling while
the spatial size allows it; a global average pool and a softmax head close the model.
Text is embedded first (`model.dim` per token), then convolved along time.

`model.filters` null (the default) picks the blocks from the input (`default_filters`): images get
one block more per halving until the last block's map is at most 4 wide, so its units see the
whole object before the average pool ((32, 64) for 8x8 digits, (32, 64, 128, 256) for 32x32,
at most 5 blocks and 256 filters); sequences and text (32, 64).

    kcp describe-model --model cnn --input-shape 32,32,3 --num-classes 10      # 4 blocks: 32, 64, 128, 256
    kcp describe-model --model cnn --set model.filters=[32,64,128] --input-shape 32,32,3 --num-classes 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional


from kcp.core.config import ConfigError, ModelConfig, option
from kcp.core.families import model_family
from trainer.models.char_ngrams import with_char_ngrams
from trainer.models.common import (ModelInputs, batch_norm, classifier_head, initializer_for, model_input,
                                   token_embedding)


@model_family("cnn")
@dataclass(frozen=True)
class CNNConfig:
    """The cnn family's own keys (`model.filters`, ...)."""

    filters: Optional[tuple] = option(None, help="filters per convolution block; null: from the input "
                                                 "(images: a block per halving down to 4 wide)")
    kernel_size: Optional[int] = option(None, minimum=1, help="kernel size; null: 5 for sequences, 3 for images "
                                                              "and text")
    convs_per_block: int = option(2, minimum=1, help="convolutions per block")
    batch_norm: bool = option(True, help="batch normalization after each convolution")
    dim: int = option(64, minimum=1, help="text: embedding size")

    default_initializer: ClassVar[str] = "he_normal"  # ReLU networks
    modalities: ClassVar[tuple] = ("image", "sequence", "text")  # the data it takes (build_model refuses the rest)
    search_space: ClassVar[dict] = {
        "model.kernel_size": [3, 5], "model.dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
        "train.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}}

    def applied(self, spec: ModelInputs) -> dict:
        """The keys whose default depends on the data, as `build` applies them to `spec`."""
        return {"filters": list(self.filters or default_filters(spec)),
                "kernel_size": self.kernel_size or default_kernel_size(spec)}

    def __post_init__(self):
        if self.filters is not None and not self.filters:
            raise ConfigError("model.filters: must list at least one block's filter count")


MAX_DEFAULT_BLOCKS, MAX_DEFAULT_FILTERS = 5, 256


def default_filters(spec: ModelInputs) -> tuple:
    """The filters of `model.filters: null`: for images one block, then one more per 2x pooling
    until the last block's map is at most 4 wide (at most MAX_DEFAULT_BLOCKS), 32 filters doubling
    per block up to MAX_DEFAULT_FILTERS; (32, 64) for sequences and text.

    On 32x32 colour digits at random places (docs/performance.md round 7), 10 epochs: (32, 64)
    reached 0.14 test accuracy, (32, 64, 128) 0.58, (32, 64, 128, 256) 0.84: with a map wider
    than the receptive field, the average pool only sees parts."""
    blocks = 2
    if spec.modality == "image":
        side = min(spec.shape[:2])
        blocks = 1
        while side > 4 and blocks < MAX_DEFAULT_BLOCKS:
            side = -(-side // 2)
            blocks += 1
        blocks = max(blocks, 2)
    return tuple(min(32 * 2**index, MAX_DEFAULT_FILTERS) for index in range(blocks))


def default_kernel_size(spec: ModelInputs) -> int:
    """`model.kernel_size: null`: 5 for sequences, 3 for images and text.

    Two 3-wide convolutions a block see 13 steps after the two blocks of a sequence: too few for a
    shape that fills the series. On the two generated sequence sets of docs/performance.md (round 10;
    five seeds, JAX on a GPU, kcp's training defaults) kernel 3 tested 0.890 (6 local patterns in 48
    steps) and 0.903 (10 wave shapes in 40 steps, train 0.930: it underfits), kernel 5 0.891 and 0.945
    (all five seeds higher); 7 was below 5 on both. Time series CNNs use such kernels (Wang et al. 2017:
    8, 5, 3)."""
    return 5 if spec.modality == "sequence" else 3


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
    block_filters = config.filters or default_filters(spec)
    for index, filters in enumerate(block_filters, start=1):
        x = conv_block(x, int(filters), config.kernel_size or default_kernel_size(spec), rank=rank, convs=config.convs_per_block,
                       config=config, initializer=initializer, name=f"block{index}")
        if spatial >= 4 and index < len(block_filters):  # keep at least 2 positions for the last block
            x = pool(2, name=f"block{index}_pool")(x)
            spatial //= 2
    global_pool = keras.layers.GlobalAveragePooling2D if rank == 2 else keras.layers.GlobalAveragePooling1D
    pooled = with_char_ngrams(global_pool(name="avg_pool")(x), inputs, spec, config)
    outputs = classifier_head(pooled, spec.num_classes, config.dropout_rate)
    return keras.Model(inputs, outputs, name=f"cnn{rank}d")
