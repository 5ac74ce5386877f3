"""Transformer encoder classifiers: tokens -> N x (self-attention, MLP) -> pooled head.

Tokens are the text's embedded ids, one per time step of a sequence (by default two 7-step
convolutions, `model.sequence_stem: conv`, so that each token carries the local shape of the 13
steps around it: 0.58 -> 0.89 test accuracy on a shape-under-shift task, docs/performance.md;
`linear` projects each step alone), or image patches (`model.image_stem: conv`, the default: for
patches larger than a pixel, convolution blocks from the pixels down to the patch grid, as the hybrid
ViT; then two 3x3 convolutions over the grid, "early convolutions", Xiao et al. 2021: digits 0.964 ->
0.990, 32x32 colour glyphs 0.780 -> 0.941, docs/performance.md; `linear`: ViT's patch projection alone).
A sinusoidal or learned position encoding is added. Each block is pre-norm: LayerNorm ->
multi-head self-attention -> dropout -> residual add, then LayerNorm -> MLP (GELU) -> residual add.
The head pools the mean of the (unpadded) tokens or a learned class token. A text row with
no real token (all padding) stays finite: attention to no key gives zeros, and its mean pool
is zeros rather than 0/0.

`attention_scores(model, inputs)` returns every block's attention probabilities
(batch, heads, tokens, tokens), for the report's attention maps.

    kcp describe-model --model transformer --set model.patch_size=4 --input-shape 32,32,3 --num-classes 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kcp.core.config import ConfigError, ModelConfig, option
from kcp.core.families import model_family
from trainer.models.char_ngrams import with_char_ngrams
from trainer.models.common import (ModelInputs, classifier_head, conv_pool_block, initializer_for, model_input,
                                   token_embedding)


# Two 7-step convolutions: each token sees 13 steps. Measured on the shape-under-shift sequences
# (docs/performance.md), test / validation accuracy: kernel 3: 0.793 / -, 5: 0.851 / 0.920, 7: 0.891 / 0.903.
SEQUENCE_STEM_KERNEL = 7
# Attention costs tokens^2 per head and example: 2,000 steps a token took over 9 GB in its first
# step at batch 64 (a user's long series); longer series are cut into patches of steps first.
MAX_SEQUENCE_TOKENS = 256


def sequence_patch(steps: int, patch: int) -> int:
    """Steps per token of a sequence: `model.sequence_patch`, or (0) 1 up to MAX_SEQUENCE_TOKENS steps
    and enough above for at most that many tokens."""
    if patch > steps:
        raise ConfigError(f"model.sequence_patch: {patch} is longer than the sequence ({steps} steps)")
    return patch or -(-steps // MAX_SEQUENCE_TOKENS)


@model_family("transformer")
@dataclass(frozen=True)
class TransformerConfig:
    """The transformer family's own keys (`model.heads`, ...)."""

    layers: int = option(2, minimum=1, help="encoder blocks")
    heads: int = option(4, minimum=1, help="attention heads")
    dim: int = option(64, minimum=1, help="model width (token embedding size)")
    mlp_dim: int = option(128, minimum=1, help="feed-forward width")
    positional: str = option("sinusoidal", choices=("sinusoidal", "learned"), help="position encoding")
    patch_size: int = option(0, minimum=0, help="images: patch side; 0: the side that gives 8x8 patches")
    sequence_patch: int = option(0, minimum=0, help="sequences: steps per token; 0: 1, or enough for 256 tokens")
    pooling: str = option("mean", choices=("mean", "cls"), help="mean of the tokens or a class token")
    sequence_stem: str = option("conv", choices=("linear", "conv"),
                                help="sequences: a linear projection of each step, or two 7-step convolutions")
    image_stem: str = option("conv", choices=("linear", "conv"),
                             help="images: ViT's linear patch projection, or convolution blocks from the pixels "
                                  "to the patch grid and two 3x3 convolutions over it")

    default_initializer: ClassVar[str] = "glorot_uniform"
    modalities: ClassVar[tuple] = ("image", "sequence", "text")  # the data it takes (build_model refuses the rest)
    search_space: ClassVar[dict] = {
        "model.layers": [1, 2], "model.heads": [2, 4], "model.dim": [32, 64],
        "train.learning_rate": {"min": 1e-4, "max": 3e-3, "sampling": "log"}}

    def applied(self, spec: ModelInputs) -> dict:
        """The keys whose default depends on the data, as `build` applies them to `spec`."""
        if spec.modality == "image":
            return {"patch_size": self.patch_size or default_patch_size(*spec.shape[:2])}
        if spec.modality == "sequence":
            return {"sequence_patch": sequence_patch(spec.shape[0], self.sequence_patch)}
        return {}

    def __post_init__(self):
        if self.dim % self.heads:
            raise ConfigError(f"model.dim: {self.dim} is not divisible by model.heads ({self.heads})")


def default_patch_size(height: int, width: int) -> int:
    """The patch side that cuts an image into about 8x8 patches (1 for 8x8 digits, 4 for 32x32)."""
    return max(1, min(height, width) // 8)


def stem_strides(patch: int) -> list:
    """The strides of the pixel stem for a patch side: 2 for every factor 2 of it, then the odd rest
    (4: [2, 2]; 6: [2, 3]; 7: [7])."""
    strides = []
    while patch % 2 == 0:
        strides.append(2)
        patch //= 2
    return strides + ([patch] if patch > 1 else [])


def pixel_stem(x, patch: int, config: ModelConfig, initializer: str):
    """Convolution blocks from the pixels to the patch grid, as the tokenizer of the hybrid ViT
    (Dosovitskiy et al. 2021) and of compact convolutional transformers (Hassani et al. 2021): per
    factor 2 of the patch side, two 3x3 convolutions (batch normalization, ReLU) and a 2x2 max pool
    (a kernel-and-stride-r convolution for an odd rest r), widths doubling up to `model.dim`; then a
    1x1 convolution (`patch_embedding`) to `model.dim`."""
    import keras

    strides = stem_strides(patch)
    for index, stride in enumerate(strides, start=1):
        width = max(1, config.dim // 2 ** (len(strides) - index))
        if stride == 2:
            x = conv_pool_block(x, width, config, f"stem_pixels{index}")
        else:
            x = keras.layers.Conv2D(width, stride, strides=stride, kernel_initializer="he_normal",
                                    name=f"stem_pixels{index}")(x)
    return keras.layers.Conv2D(config.dim, 1, kernel_initializer=initializer, name="patch_embedding")(x)


def encoder_block(x, *, heads: int, dim: int, mlp_dim: int, dropout: float, initializer: str,
                  attention_mask, name: str):
    """One pre-norm encoder block; its attention layer is `{name}_attention`."""
    import keras

    h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
    h, _ = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=dropout, kernel_initializer=initializer,
                                           name=f"{name}_attention")(
        h, h, attention_mask=attention_mask, return_attention_scores=True)
    h = keras.layers.Dropout(dropout, name=f"{name}_attention_dropout")(h)
    x = keras.layers.Add(name=f"{name}_attention_add")([x, h])
    h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
    h = keras.layers.Dense(mlp_dim, activation="gelu", kernel_initializer=initializer, name=f"{name}_mlp1")(h)
    h = keras.layers.Dropout(dropout, name=f"{name}_mlp_dropout1")(h)
    h = keras.layers.Dense(dim, kernel_initializer=initializer, name=f"{name}_mlp2")(h)
    h = keras.layers.Dropout(dropout, name=f"{name}_mlp_dropout2")(h)
    return keras.layers.Add(name=f"{name}_mlp_add")([x, h])


def build(spec: ModelInputs, config: ModelConfig):
    """Builds the encoder classifier for images (patches), sequences (steps) or text (tokens)."""
    import keras
    from keras import ops
    from trainer.models.layers import ClassToken, MaskedAveragePooling, PositionEncoding

    initializer = initializer_for(config)
    inputs, x = model_input(spec, config)
    padding = None  # (batch, tokens) True where a token is real; text only
    if spec.modality == "image":
        height, width, _ = spec.shape
        patch = config.patch_size or default_patch_size(height, width)
        if patch > min(height, width):
            raise ConfigError(f"model.patch_size: {patch} is larger than the image ({height}x{width})")
        if config.image_stem == "conv" and patch > 1:  # from the pixels to the patch grid in conv blocks
            x = pixel_stem(x, patch, config, initializer)  # (batch, H/p, W/p, dim)
        else:
            x = keras.layers.Conv2D(config.dim, patch, strides=patch, kernel_initializer=initializer,
                                    name="patch_embedding")(x)  # (batch, H/p, W/p, dim)
        if config.image_stem == "conv":  # each patch sees its 5x5 neighbourhood of patches, as sequences' stem
            x = keras.layers.Conv2D(config.dim, 3, padding="same", activation="gelu", kernel_initializer=initializer,
                                    name="stem_conv1")(x)
            x = keras.layers.Conv2D(config.dim, 3, padding="same", kernel_initializer=initializer,
                                    name="stem_conv2")(x)
        x = keras.layers.Reshape((x.shape[1] * x.shape[2], config.dim), name="patches")(x)
    elif spec.modality == "sequence" and config.sequence_stem == "conv":
        # each token sees its neighbours (a local shape), as in "early convolutions" (Xiao et al. 2021); 13 steps
        # in all, the span of the first two convolutions (8, 5) of the FCN time-series baseline (Wang et al. 2017)
        x = keras.layers.Conv1D(config.dim, SEQUENCE_STEM_KERNEL, padding="same", activation="gelu",
                                kernel_initializer=initializer, name="stem_conv1")(x)
        patch = sequence_patch(spec.shape[0], config.sequence_patch)  # strided: a token per `patch` steps
        x = keras.layers.Conv1D(config.dim, max(SEQUENCE_STEM_KERNEL, patch), strides=patch, padding="same",
                                kernel_initializer=initializer, name="stem_conv2")(x)
    elif spec.modality == "sequence" and sequence_patch(spec.shape[0], config.sequence_patch) > 1:
        patch = sequence_patch(spec.shape[0], config.sequence_patch)  # ViT's patch projection, of steps
        x = keras.layers.Conv1D(config.dim, patch, strides=patch, padding="same", kernel_initializer=initializer,
                                name="step_projection")(x)
    elif spec.modality == "sequence":
        x = keras.layers.Dense(config.dim, kernel_initializer=initializer, name="step_projection")(x)
    else:
        padding = ops.not_equal(x, 0)
        x = token_embedding(x, spec, config.dim, mask_zero=False,  # masks are explicit below
                            word_dropout=config.word_dropout)
    x = PositionEncoding(config.positional, name="position_encoding")(x)  # (batch, tokens, dim)
    if config.pooling == "cls":
        x = ClassToken(name="class_token")(x)
        if padding is not None:
            padding = ops.concatenate([ops.ones_like(padding[:, :1]), padding], axis=1)
    attention_mask = None
    if padding is not None:
        tokens = x.shape[1]
        attention_mask = ops.repeat(ops.expand_dims(padding, 1), tokens, axis=1)  # (batch, query, key)
    x = keras.layers.Dropout(config.dropout_rate, name="token_dropout")(x)
    for index in range(1, config.layers + 1):
        x = encoder_block(x, heads=config.heads, dim=config.dim, mlp_dim=config.mlp_dim, dropout=config.dropout_rate,
                          initializer=initializer, attention_mask=attention_mask, name=f"block{index}")
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    if config.pooling == "cls":
        pooled = x[:, 0]
    elif padding is not None:
        pooled = MaskedAveragePooling(name="avg_pool")([x, padding])  # finite when a row has no token
    else:
        pooled = keras.layers.GlobalAveragePooling1D(name="avg_pool")(x)
    outputs = classifier_head(with_char_ngrams(pooled, inputs, spec, config), spec.num_classes, config.dropout_rate)
    return keras.Model(inputs, outputs, name="transformer")


def attention_layers(model) -> list:
    """The model's attention layers in block order."""
    layers = [layer for layer in model.layers if layer.name.endswith("_attention") and layer.name.startswith("block")]
    return sorted(layers, key=lambda layer: int(layer.name[len("block"):-len("_attention")]))


def attention_scores(model, inputs) -> list:
    """Attention probabilities of every block for a batch: a list of (batch, heads, tokens, tokens)."""
    import keras

    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no attention layers")
    probe = keras.Model(model.input, [layer.output[1] for layer in layers])
    outputs = probe(inputs, training=False)  # eager: no predict function to trace for a one-off probe
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return [keras.ops.convert_to_numpy(output) for output in outputs]
