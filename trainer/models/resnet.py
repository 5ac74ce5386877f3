"""Residual networks (He et al. 2015, 2016): v1 (post-activation) and v2 (pre-activation).

- CIFAR-style, depth 6n+2 (20, 32, 44, 56, 110): a 3x3 stem, three stages of n basic
  blocks with `width`, 2x`width`, 4x`width` filters (width 16; 32 for images larger than 16x16,
  as wide ResNets), 1x1 projection shortcuts
  where the shape changes. No bias before batch norm, as in the paper (ResNet-20: 0.27M).
- ImageNet-style, depth 18/34 (basic blocks) or 50/101/152 (bottleneck blocks): a 7x7/2
  stem and max pool, four stages of width 64..512 (x4 for bottlenecks). Layers mirror
  `keras.applications.resnet` (convolutions with bias, BN epsilon 1.001e-5), so ResNet-50
  v1 has exactly its 25,636,712 parameters and the same layer names.
- Sequences and text use the same blocks with 1D convolutions; `depth: 0` (the default) is 8 for
  sequences (one block a stage), 20 otherwise (`default_depth`), and sequences get 5-wide
  convolutions with 0.3 dropout before the classifier (`default_kernel_and_dropout`). Text: the token embedding
  (`dim`), 30% dropout on it (`embedding_dropout`), and stages as wide as the embedding
  (`width: 0` means `dim` there): measured in docs/performance.md.

    kcp describe-model --model resnet --set model.depth=56 --input-shape 32,32,3 --num-classes 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional


from kcp.core.config import DEFAULT_DROPOUT, ConfigError, ModelConfig, option
from kcp.core.families import model_family
from trainer.models.char_ngrams import with_char_ngrams
from trainer.models.cnn import default_kernel_size  # one rule for both families' sequence kernels
from trainer.models.common import (ModelInputs, batch_norm, classifier_head, initializer_for, model_input,
                                   token_embedding)

IMAGENET_STAGES = {  # depth -> (blocks per stage, bottleneck)
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
BN_EPSILON = 1.001e-5
WIDE_IMAGE_SIDE = 16  # CIFAR-style stages start at 32 filters for images larger than this (16 up to it)
DEFAULT_DEPTH, SEQUENCE_DEPTH = 20, 8
SEQUENCE_DROPOUT = 0.3  # model.dropout: null, for sequences (DEFAULT_DROPOUT otherwise)


def default_depth(spec: ModelInputs) -> int:
    """`model.depth: 0`: ResNet-8 for sequences, ResNet-20 for images and text.

    On the two generated sequence sets of docs/performance.md (round 10; five seeds, JAX on a GPU, kcp's
    training defaults) ResNet-20 fitted its training series (train 1.000) and tested 0.868 (6 local
    patterns in 48 steps) and 0.894 (10 wave shapes in 40 steps); ResNet-8 0.877 and 0.906, at a third
    of the parameters (29k against 95k) and less time. ResNet-14 was level with ResNet-20 on the patterns."""
    return SEQUENCE_DEPTH if spec.modality == "sequence" else DEFAULT_DEPTH


def default_kernel_and_dropout(spec: ModelInputs) -> tuple[int, float]:
    """`model.kernel_size: null` (CIFAR-style nets) and `model.dropout: null`: 5 and 0.3 for sequences,
    3 and 0.1 (`DEFAULT_DROPOUT`) for images and text.

    The kernel is the cnn's (`default_kernel_size`); as there, and as time-series ResNets (Wang et al. 2017: 8, 5, 3),
    ResNet-8 on sequences sees more steps with 5-wide convolutions; alone they overfit the 6 local
    patterns (train 1.000), and with 0.3 dropout before the classifier they do not. On the two
    generated sequence sets of docs/performance.md (round 11; seeds 0-4, JAX on 2 cores, kcp's
    training defaults), mean test accuracy: waves 0.907 -> 0.927, patterns 0.879 -> 0.873;
    validation 0.908 -> 0.936 and 0.876 -> 0.875."""
    return default_kernel_size(spec), SEQUENCE_DROPOUT if spec.modality == "sequence" else DEFAULT_DROPOUT


def default_cifar_width(spec: ModelInputs, dim: int) -> int:
    """`model.width: 0` of a CIFAR-style net: 16 for sequences and images up to 16 pixels a side (1-3
    channels in, a widening), 32 for larger images, the embedding's width `model.dim` for text.

    A 16-channel stem after a 64-wide token embedding squeezes every token into 16 numbers. On the
    6-class text lines (docs/performance.md) ResNet-20's test accuracy: base width 16: 0.627, 32: 0.702,
    64: 0.770 (0.750 with another seed). On 32x32 colour glyphs (round 8) width 32, twice the CIFAR
    ResNet's as in wide ResNets (Zagoruyko and Komodakis 2016): 0.904 -> 0.947, 2.7x the time."""
    if spec.modality == "text":
        return dim
    if spec.modality == "image" and min(spec.shape[:2]) > WIDE_IMAGE_SIDE:
        return 32
    return 16


def resnet_style(depth: int) -> Optional[str]:
    """'imagenet' for 18/34/50/101/152, 'cifar' for other depths 6n+2, None otherwise."""
    if depth in IMAGENET_STAGES:
        return "imagenet"
    if depth >= 8 and (depth - 2) % 6 == 0:
        return "cifar"
    return None


@model_family("resnet")
@dataclass(frozen=True)
class ResNetConfig:
    """The resnet family's own keys (`model.depth`, ...)."""

    depth: int = option(0, minimum=0, help="6n+2 (8, 14, 20, 32, 44, 56, 110) CIFAR-style; 18, 34, 50, 101, 152 "
                                           "ImageNet-style; 0: 8 for sequences, 20 otherwise")
    version: int = option(1, choices=(1, 2), help="1 (post-activation) or 2 (pre-activation)")
    width: int = option(0, minimum=0, help="base filters; 0: CIFAR-style 16 (images larger than 16x16: 32; text: "
                                           "model.dim), 64 ImageNet-style")
    kernel_size: Optional[int] = option(None, minimum=1, help="CIFAR-style: the stem's and the blocks' kernel size; "
                                                              "null: 5 for sequences, 3 for images and text")
    dim: int = option(64, minimum=1, help="text: embedding size")
    # Measured on the 6-class text lines (docs/performance.md), test accuracy over two seeds:
    # 0.770 / 0.750 without, 0.806 / 0.814 with 0.3; the net fits its training lines either way.
    embedding_dropout: float = option(0.3, minimum=0.0, maximum=0.95, help="text: dropout after the embedding")

    default_initializer: ClassVar[str] = "he_normal"  # ReLU networks
    modalities: ClassVar[tuple] = ("image", "sequence", "text")  # the data it takes (build_model refuses the rest)
    search_space: ClassVar[dict] = {
        "model.depth": [8, 20, 32], "model.version": [1, 2],
        "train.learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}}

    def applied(self, spec: ModelInputs) -> dict:
        """The keys whose default depends on the data, as `build` applies them to `spec`; `dropout` is
        what the shared `model.dropout: null` comes to."""
        depth = self.depth or default_depth(spec)
        kernel, dropout = default_kernel_and_dropout(spec)
        if resnet_style(depth) != "cifar":
            return {"depth": depth, "width": self.width or 64, "dropout": dropout}
        return {"depth": depth, "width": self.width or default_cifar_width(spec, self.dim),
                "kernel_size": self.kernel_size or kernel, "dropout": dropout}

    def __post_init__(self):
        if self.depth and resnet_style(self.depth) is None:
            raise ConfigError(f"model.depth: {self.depth} is not a ResNet depth; allowed: 6n+2 "
                              f"(20, 32, 44, 56, 110) or {', '.join(map(str, IMAGENET_STAGES))}")
        if self.kernel_size and self.depth in IMAGENET_STAGES:
            raise ConfigError(f"model.kernel_size: {self.kernel_size} applies to CIFAR-style depths (6n+2); "
                              f"ResNet-{self.depth} keeps keras.applications' 7 and 3")


class _Layers:
    """Picks 1D or 2D layers once, so the blocks below are written once for both."""

    def __init__(self, rank: int, initializer: str, use_bias: bool, config: ModelConfig):
        import keras

        self.keras = keras
        self.rank, self.initializer, self.use_bias, self.config = rank, initializer, use_bias, config

    def conv(self, x, filters, kernel_size, stride=1, name=None, padding="same"):
        conv = self.keras.layers.Conv2D if self.rank == 2 else self.keras.layers.Conv1D
        return conv(filters, kernel_size, strides=stride, padding=padding, use_bias=self.use_bias,
                    kernel_initializer=self.initializer, name=name)(x)

    def bn(self, x, name):
        return batch_norm(x, self.config, name, epsilon=BN_EPSILON)

    def relu(self, x, name):
        return self.keras.layers.Activation("relu", name=name)(x)

    def add(self, tensors, name):
        return self.keras.layers.Add(name=name)(tensors)


def basic_block(layers: _Layers, x, filters: int, stride: int, *, preact: bool, name: str, kernel: int = 3):
    """Two 3x3 convolutions with an identity or 1x1-projection shortcut."""
    projection = stride != 1 or x.shape[-1] != filters
    if preact:  # v2: BN-ReLU before each convolution; the shortcut branches after the first
        y = layers.relu(layers.bn(x, f"{name}_preact_bn"), f"{name}_preact_relu")
        shortcut = layers.conv(y, filters, 1, stride, name=f"{name}_0_conv") if projection else x
        y = layers.conv(y, filters, kernel, stride, name=f"{name}_1_conv")
        y = layers.relu(layers.bn(y, f"{name}_1_bn"), f"{name}_1_relu")
        y = layers.conv(y, filters, kernel, name=f"{name}_2_conv")
        return layers.add([shortcut, y], f"{name}_out")
    shortcut = x
    if projection:
        shortcut = layers.bn(layers.conv(x, filters, 1, stride, name=f"{name}_0_conv"), f"{name}_0_bn")
    y = layers.conv(x, filters, kernel, stride, name=f"{name}_1_conv")
    y = layers.relu(layers.bn(y, f"{name}_1_bn"), f"{name}_1_relu")
    y = layers.bn(layers.conv(y, filters, kernel, name=f"{name}_2_conv"), f"{name}_2_bn")
    return layers.relu(layers.add([shortcut, y], f"{name}_add"), f"{name}_out")


def bottleneck_block(layers: _Layers, x, filters: int, stride: int, *, preact: bool, name: str):
    """1x1 reduce, 3x3, 1x1 expand to 4x`filters`, as keras.applications' block1 (v1) / block2 (v2)."""
    expanded = 4 * filters
    projection = stride != 1 or x.shape[-1] != expanded
    if preact:
        y = layers.relu(layers.bn(x, f"{name}_preact_bn"), f"{name}_preact_relu")
        shortcut = layers.conv(y, expanded, 1, stride, name=f"{name}_0_conv") if projection else x
        y = layers.conv(y, filters, 1, name=f"{name}_1_conv")
        y = layers.relu(layers.bn(y, f"{name}_1_bn"), f"{name}_1_relu")
        y = layers.conv(y, filters, 3, stride, name=f"{name}_2_conv")
        y = layers.relu(layers.bn(y, f"{name}_2_bn"), f"{name}_2_relu")
        y = layers.conv(y, expanded, 1, name=f"{name}_3_conv")
        return layers.add([shortcut, y], f"{name}_out")
    shortcut = x
    if projection:
        shortcut = layers.bn(layers.conv(x, expanded, 1, stride, name=f"{name}_0_conv"), f"{name}_0_bn")
    y = layers.conv(x, filters, 1, stride, name=f"{name}_1_conv")
    y = layers.relu(layers.bn(y, f"{name}_1_bn"), f"{name}_1_relu")
    y = layers.conv(y, filters, 3, name=f"{name}_2_conv")
    y = layers.relu(layers.bn(y, f"{name}_2_bn"), f"{name}_2_relu")
    y = layers.bn(layers.conv(y, expanded, 1, name=f"{name}_3_conv"), f"{name}_3_bn")
    return layers.relu(layers.add([shortcut, y], f"{name}_add"), f"{name}_out")


def stack(layers: _Layers, x, block, filters: int, blocks: int, stride: int, *, preact: bool, name: str, **kernel):
    """One stage: `blocks` residual blocks, the first with `stride`; names `{name}_block{i}`."""
    for index in range(1, blocks + 1):
        x = block(layers, x, filters, stride if index == 1 else 1, preact=preact, name=f"{name}_block{index}",
                  **kernel)
    return x


def build(spec: ModelInputs, config: ModelConfig):
    """Builds ResNet-`model.depth`, `model.version` 1 or 2, for images, sequences or text."""
    import keras

    depth = config.depth or default_depth(spec)
    style = resnet_style(depth)
    preact = config.version == 2
    rank = 2 if spec.modality == "image" else 1
    layers = _Layers(rank, initializer_for(config), use_bias=style == "imagenet", config=config)
    inputs, x = model_input(spec, config)
    if spec.modality == "text":
        x = token_embedding(x, spec, config.dim, mask_zero=False, dropout=config.embedding_dropout,
                            word_dropout=config.word_dropout)

    kernel, dropout = default_kernel_and_dropout(spec)
    if style == "cifar":
        width = config.width or default_cifar_width(spec, config.dim)
        blocks = (depth - 2) // 6
        kernel = config.kernel_size or kernel
        x = layers.conv(x, width, kernel, name="conv1_conv")
        if not preact:
            x = layers.relu(layers.bn(x, "conv1_bn"), "conv1_relu")
        for stage, multiplier in enumerate((1, 2, 4)):
            x = stack(layers, x, basic_block, width * multiplier, blocks, 1 if stage == 0 else 2,
                      preact=preact, name=f"conv{stage + 2}", kernel=kernel)
    else:
        width = config.width or 64
        stage_blocks, bottleneck = IMAGENET_STAGES[depth]
        padding = keras.layers.ZeroPadding2D if rank == 2 else keras.layers.ZeroPadding1D
        pool = keras.layers.MaxPooling2D if rank == 2 else keras.layers.MaxPooling1D
        x = padding(3, name="conv1_pad")(x)
        x = layers.conv(x, width, 7, 2, name="conv1_conv", padding="valid")
        if not preact:
            x = layers.relu(layers.bn(x, "conv1_bn"), "conv1_relu")
        x = padding(1, name="pool1_pad")(x)
        x = pool(3, strides=2, name="pool1_pool")(x)
        block = bottleneck_block if bottleneck else basic_block
        for stage, blocks in enumerate(stage_blocks):
            x = stack(layers, x, block, width * 2**stage, blocks, 1 if stage == 0 else 2,
                      preact=preact, name=f"conv{stage + 2}")
    if preact:
        x = layers.relu(layers.bn(x, "post_bn"), "post_relu")
    global_pool = keras.layers.GlobalAveragePooling2D if rank == 2 else keras.layers.GlobalAveragePooling1D
    pooled = with_char_ngrams(global_pool(name="avg_pool")(x), inputs, spec, config)
    outputs = classifier_head(pooled, spec.num_classes, dropout if config.dropout is None else config.dropout)
    return keras.Model(inputs, outputs, name=f"resnet{depth}_v{config.version}")
