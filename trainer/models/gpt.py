"""GPT: a decoder-only language model, tokens -> N x (causal self-attention, MLP) -> next-token logits.

The GPT-2 architecture (Radford et al. 2019, as in nanoGPT): learned token and position
embeddings, pre-norm blocks (LayerNorm -> causal multi-head self-attention -> residual add,
LayerNorm -> MLP 4x wide with tanh-GELU -> residual add), a final LayerNorm, and logits from
the token-embedding matrix transposed (tied input/output embeddings, no output bias). Every
q/k/v, output, MLP projection and LayerNorm has a bias, as GPT-2's; the GPT-2 small shape (12
layers, 12 heads, width 768, context 1024, vocabulary 50,257) has exactly 124,439,808
parameters (tests/trainer/test_gpt.py).

Initialisation is GPT-2's: kernels and embeddings normal with std 0.02, and the two
projections that write into the residual stream (attention output, second MLP layer) with
std 0.02 / sqrt(2 x layers), so the residual's variance does not grow with depth. A
`model.initializer` choice replaces the kernels' initializer (embeddings keep std 0.02).
Dropout (`model.dropout`) acts on the embeddings and on each residual branch; attention
probabilities are not dropped, because the fused attention kernels
(`keras.ops.dot_product_attention`, flash attention where the backend has it) take no dropout.

The input `tokens` is int32 (batch, time) with time at most the context (the data contract's
`context_length`); shorter sequences use the first positions, so generation can call the
model on a prefix. The logits are float32 even under mixed precision. trainer/generate.py
samples from the model with a key/value cache that runs the blocks' own layers
(`DecoderBlock.decode_step`), so a reloaded `model.keras` generates as the trained one did.

    kcp describe-model --model gpt --set model.size=gpt2-small   # on a language run's contract
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from typing import ClassVar

from kcp.core.config import ConfigError, ModelConfig, option
from kcp.core.families import model_family
from trainer.models.common import ModelInputs

# (layers, heads, width) of the GPT-2 checkpoints; "custom" uses model.layers/heads/dim.
SIZES = {"gpt2-small": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
         "gpt2-xl": (48, 25, 1600)}
INITIALIZER_STD = 0.02  # GPT-2's
LAYER_NORM_EPSILON = 1e-5  # GPT-2's


@model_family("gpt")
@dataclass(frozen=True)
class GPTConfig:
    """The gpt family's own keys (`model.layers`, `model.size`, ...).

    The defaults (4 layers, 4 heads, width 256: 3.2 M parameters besides the embeddings) are
    sized for a ~30 minute run on 2 CPU cores on a few MB of Python source at context 256:
    training costs about 6 x 3.2 M + 12 x 4 x 256 x 256 = 22 MFLOP per token; 2,400-3,700
    tokens/s were measured on 2 idle cores, so 30 min train on 4-6 M tokens, about 4 passes over
    the bpe-tokenized python-stdlib (the family's 4 epochs). Larger models see fewer tokens in
    the same time and end worse (Kaplan et al. 2020: a small compute budget's best model is
    small); much smaller ones stop short of the syntax of code. `model.size` picks a GPT-2
    shape instead.
    """

    size: str = option("custom", choices=("custom", *SIZES),
                       help="custom: model.layers/heads/dim; a GPT-2 size sets all three")
    layers: int = option(4, minimum=1, help="decoder blocks")
    heads: int = option(4, minimum=1, help="attention heads")
    dim: int = option(256, minimum=1, help="model width (token embedding size)")
    mlp_ratio: int = option(4, minimum=1, help="feed-forward width as a multiple of model.dim")

    default_initializer: ClassVar[str] = "gpt2_normal"  # normal(0.02), residual projections scaled by depth
    modalities: ClassVar[tuple] = ("language",)  # the data it takes (build_model refuses the rest)
    # Training defaults of its own (kcp/core/config.py lays them under the run's and the user's
    # keys): nanoGPT's recipe for small GPTs, AdamW with weight decay 0.1 on the matrices only
    # (trainer/train.py), a short linear warmup then cosine decay, clipping at global norm 1, and
    # the validation loss as the monitor and tuning objective: there is no accuracy to maximise.
    # Batch 8 blocks (2,048 tokens a step at context 256): on the default corpus a small model is
    # limited by its optimizer steps, not its tokens: with bpe, 2 epochs gave held-out bits per byte
    # 2.408 at batch 64 (126 steps), 2.101 at 16 (500) and 1.827 at 8 (1,000), at about the same
    # tokens per second on 2 cores (docs/performance.md). 4 epochs: about 25-30 min there with bpe.
    # data.vocab_size 4096 (ids in all) bounds the learned vocabularies of language data: bpe
    # learns 4096 - 259 merges at most, a few thousand, as fits a corpus of a few MB.
    training_defaults: ClassVar[dict] = {
        "data": {"vocab_size": 4096},
        "train": {"optimizer": "adamw", "learning_rate": 2e-3, "weight_decay": 0.1, "clip_norm": 1.0,
                  "schedule": "cosine", "warmup_epochs": 0.1, "monitor": "val_loss",
                  "batch_size": 8, "epochs": 4},
        "tune": {"objective": "val_loss", "direction": "min"},
    }
    search_space: ClassVar[dict] = {
        "model.layers": [2, 4], "model.dim": [128, 256],
        "train.learning_rate": {"min": 1e-4, "max": 3e-3, "sampling": "log"}}

    def __post_init__(self):
        if self.size != "custom":
            preset = dict(zip(("layers", "heads", "dim"), SIZES[self.size]))
            defaults = {key: type(self).__dataclass_fields__[key].default for key in preset}
            for key, value in preset.items():
                # a value equal to the custom default cannot be told from an unset one: the preset wins
                if getattr(self, key) not in (value, defaults[key]):
                    raise ConfigError(f"model.{key}: {getattr(self, key)} conflicts with model.size: {self.size} "
                                      f"({key} {value}); set model.size: custom to choose it")
                object.__setattr__(self, key, value)
        if self.dim % self.heads:
            raise ConfigError(f"model.dim: {self.dim} is not divisible by model.heads ({self.heads})")


def parameter_count(*, vocab_size: int, context: int, layers: int, dim: int, mlp_ratio: int = 4) -> int:
    """The exact parameter count of this architecture (tied embeddings, GPT-2's biases and norms)."""
    mlp = mlp_ratio * dim
    block = (2 * dim              # first LayerNorm
             + dim * 3 * dim + 3 * dim  # q, k, v projection
             + dim * dim + dim    # attention output projection
             + 2 * dim            # second LayerNorm
             + dim * mlp + mlp    # MLP in
             + mlp * dim + dim)   # MLP out
    return vocab_size * dim + context * dim + layers * block + 2 * dim  # + final LayerNorm


def kernel_initializers(config: ModelConfig) -> tuple:
    """(kernel, residual projection) initializers: GPT-2's, or `model.initializer` for both."""
    import keras

    if config.initializer:
        return keras.initializers.get(config.initializer), keras.initializers.get(config.initializer)
    return (keras.initializers.RandomNormal(stddev=INITIALIZER_STD),
            keras.initializers.RandomNormal(stddev=INITIALIZER_STD / math.sqrt(2 * config.layers)))


def build(spec: ModelInputs, config: ModelConfig):
    """Builds the GPT language model: int32 `tokens` (batch, time <= context) -> float32 logits
    (batch, time, vocab_size)."""
    import keras

    classes = layer_classes()
    TiedEmbedding, PositionEmbedding, DecoderBlock = (classes.TiedEmbedding, classes.PositionEmbedding,
                                                      classes.DecoderBlock)

    if spec.modality != "language":
        raise ConfigError(f"model.name: gpt is a language model; the data's modality is {spec.modality!r}, "
                          "not 'language'")
    context = int(spec.shape[0])
    kernel_initializer, projection_initializer = kernel_initializers(config)
    embedding_initializer = keras.initializers.RandomNormal(stddev=INITIALIZER_STD)

    tokens = keras.Input(shape=(None,), dtype="int32", name=spec.input_name)  # shorter than context too
    embedding = TiedEmbedding(spec.vocab_size, config.dim, embeddings_initializer=embedding_initializer,
                              name="token_embedding")
    x = embedding(tokens)  # (batch, time, dim)
    x = PositionEmbedding(context, embeddings_initializer=embedding_initializer, name="position_embedding")(x)
    x = keras.layers.Dropout(config.dropout_rate, name="embedding_dropout")(x)
    for index in range(1, config.layers + 1):
        x = DecoderBlock(config.dim, config.heads, config.mlp_ratio * config.dim, dropout=config.dropout_rate,
                         kernel_initializer=kernel_initializer, projection_initializer=projection_initializer,
                         name=f"block{index}")(x)
    x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="final_norm")(x)
    logits = embedding(x, reverse=True)  # (batch, time, vocab_size): the same matrix, transposed
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(logits)  # float32 under mixed precision
    return keras.Model(tokens, logits, name="gpt")


def model_parts(model) -> dict:
    """The layers generation and attention maps run one by one: token and position embeddings,
    the blocks in order, the final norm."""
    blocks = [layer for layer in model.layers if layer.name.startswith("block") and layer.name[5:].isdigit()]
    if not blocks:
        raise ValueError(f"model {model.name!r} has no decoder blocks: not a gpt model")
    return {"embedding": model.get_layer("token_embedding"), "position": model.get_layer("position_embedding"),
            "blocks": sorted(blocks, key=lambda layer: int(layer.name[5:])),
            "final_norm": model.get_layer("final_norm")}


def context_length(model) -> int:
    """The longest sequence the model takes (its position table's length)."""
    return int(model.get_layer("position_embedding").context)


@functools.cache
def layer_classes() -> types.SimpleNamespace:
    """The family's custom layers: TiedEmbedding, PositionEmbedding, DecoderBlock.

    They are defined on the first call, not at import: this module is imported to validate
    configs, which must not wait for Keras and TensorFlow (trainer/models/__init__.py). The
    first call also registers them (package `kcp`) for `keras.saving.load_model`: call it, or
    `build`, or import trainer.generate, before loading a gpt `model.keras`.
    """
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="kcp")
    class TiedEmbedding(keras.layers.Layer):
        """Token ids -> vectors, and, called with `reverse=True`, vectors -> logits with the same
        matrix transposed (tied input and output embeddings, no output bias, as GPT-2)."""

        def __init__(self, vocab_size: int, dim: int, embeddings_initializer="random_normal", **kwargs):
            super().__init__(**kwargs)
            self.vocab_size, self.dim = int(vocab_size), int(dim)
            self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

        def build(self, input_shape=None):
            self.embeddings = self.add_weight(shape=(self.vocab_size, self.dim), name="embeddings",
                                              initializer=self.embeddings_initializer)

        def call(self, inputs, reverse: bool = False):
            if reverse:  # (..., dim) -> (..., vocab_size)
                return ops.matmul(inputs, ops.transpose(ops.convert_to_tensor(self.embeddings)))
            return ops.take(ops.convert_to_tensor(self.embeddings), ops.cast(inputs, "int32"), axis=0)  # (..., dim)

        def get_config(self):
            return {**super().get_config(), "vocab_size": self.vocab_size, "dim": self.dim,
                    "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer)}

    @keras.saving.register_keras_serializable(package="kcp")
    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned vector per position to (batch, time, dim), positions start..start+time-1."""

        def __init__(self, context: int, embeddings_initializer="random_normal", **kwargs):
            super().__init__(**kwargs)
            self.context = int(context)
            self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

        def build(self, input_shape):
            self.dim = int(input_shape[-1])
            self.embeddings = self.add_weight(shape=(self.context, self.dim), name="embeddings",
                                              initializer=self.embeddings_initializer)

        def call(self, x, start=0):
            length = x.shape[1]
            if isinstance(length, int) and length > self.context:
                raise ValueError(f"sequence of {length} tokens is longer than the model's context ({self.context})")
            length = ops.shape(x)[1]  # a tensor where the time axis is dynamic (TF graphs)
            table = ops.slice(ops.cast(self.embeddings, x.dtype), (start, 0), (length, self.dim))  # (time, dim)
            return x + table[None]

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "context": self.context,
                    "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer)}

    @keras.saving.register_keras_serializable(package="kcp")
    class DecoderBlock(keras.layers.Layer):
        """One pre-norm GPT-2 block on (batch, time, dim): x + attention(norm1(x)), then
        x + MLP(norm2(x)), attention causal. `decode_step` runs the same layers on one token
        against a key/value cache; `attention_probabilities` gives the explicit softmax."""

        def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0,
                     kernel_initializer="glorot_uniform", projection_initializer="glorot_uniform", **kwargs):
            super().__init__(**kwargs)
            if dim % heads:
                raise ValueError(f"model.dim: {dim} is not divisible by model.heads ({heads})")
            self.dim, self.heads, self.mlp_dim, self.dropout_rate = int(dim), int(heads), int(mlp_dim), float(dropout)
            self.head_dim = self.dim // self.heads
            self.kernel_initializer = keras.initializers.get(kernel_initializer)
            self.projection_initializer = keras.initializers.get(projection_initializer)
            self.norm1 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm1")
            self.qkv = keras.layers.Dense(3 * self.dim, kernel_initializer=self.kernel_initializer, name="qkv")
            self.attention_projection = keras.layers.Dense(self.dim, kernel_initializer=self.projection_initializer,
                                                           name="attention_projection")
            self.norm2 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm2")
            self.mlp_in = keras.layers.Dense(self.mlp_dim, kernel_initializer=self.kernel_initializer, name="mlp_in")
            self.mlp_out = keras.layers.Dense(self.dim, kernel_initializer=self.projection_initializer, name="mlp_out")
            self.dropout = keras.layers.Dropout(self.dropout_rate, name="residual_dropout")

        def build(self, input_shape):
            if int(input_shape[-1]) != self.dim:
                raise ValueError(f"block {self.name} expects width {self.dim}, got input shape {input_shape}")
            width = (None, None, self.dim)
            for layer in (self.norm1, self.qkv, self.attention_projection, self.norm2, self.mlp_in):
                layer.build(width)
            self.mlp_out.build((None, None, self.mlp_dim))

        def split_heads(self, x):
            """norm1(x) -> q, k, v, each (batch, time, heads, head_dim)."""
            batch, time = ops.shape(x)[0], ops.shape(x)[1]
            qkv = ops.reshape(self.qkv(self.norm1(x)), (batch, time, 3, self.heads, self.head_dim))
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        def merge_heads(self, x):
            """(batch, time, heads, head_dim) -> the attention projection's output (batch, time, dim)."""
            batch, time = ops.shape(x)[0], ops.shape(x)[1]
            return self.attention_projection(ops.reshape(x, (batch, time, self.dim)))

        def mlp(self, x, training=None):
            h = ops.gelu(self.mlp_in(self.norm2(x)), approximate=True)  # GPT-2's tanh GELU
            return self.dropout(self.mlp_out(h), training=training)

        def call(self, x, training=None):
            query, key, value = self.split_heads(x)
            attended = ops.dot_product_attention(query, key, value, is_causal=True)  # fused where available
            x = x + self.dropout(self.merge_heads(attended), training=training)
            return x + self.mlp(x, training)

        def decode_step(self, x, keys, values, position):
            """One token at `position` (a scalar): x (batch, 1, dim); keys and values (batch, context,
            heads, head_dim) hold the earlier positions. Returns (x, keys, values), the caches with
            this token's key and value written at `position`."""
            query, key, value = self.split_heads(x)  # (batch, 1, heads, head_dim)
            start = (0, position, 0, 0)
            keys = ops.slice_update(keys, start, ops.cast(key, keys.dtype))
            values = ops.slice_update(values, start, ops.cast(value, values.dtype))
            scores = ops.einsum("bqhd,bkhd->bhqk", query, keys)  # (batch, heads, 1, context)
            scores = ops.cast(scores, "float32") / math.sqrt(self.head_dim)
            visible = ops.arange(ops.shape(keys)[1]) <= position  # this and earlier positions
            probabilities = ops.softmax(ops.where(visible, scores, float("-inf")), axis=-1)
            attended = ops.einsum("bhqk,bkhd->bqhd", ops.cast(probabilities, values.dtype), values)
            x = x + self.merge_heads(attended)
            return x + self.mlp(x), keys, values

        def attention_probabilities(self, x):
            """The causal attention softmax for (batch, time, dim): (batch, heads, time, time), float32."""
            query, key, _ = self.split_heads(x)
            scores = ops.cast(ops.einsum("bqhd,bkhd->bhqk", query, key), "float32") / math.sqrt(self.head_dim)
            time = ops.shape(x)[1]
            causal = ops.arange(time)[:, None] >= ops.arange(time)[None, :]  # query sees keys up to itself
            return ops.softmax(ops.where(causal, scores, float("-inf")), axis=-1)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "dim": self.dim, "heads": self.heads, "mlp_dim": self.mlp_dim,
                    "dropout": self.dropout_rate,
                    "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                    "projection_initializer": keras.initializers.serialize(self.projection_initializer)}

    return types.SimpleNamespace(TiedEmbedding=TiedEmbedding, PositionEmbedding=PositionEmbedding,
                                 DecoderBlock=DecoderBlock)
