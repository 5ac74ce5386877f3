"""What every model family shares: the input spec taken from the contract, the input
layers (online augmentation, normalisation with the pipeline's statistics, token
embedding), the initializer choice and the classifier head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kcp.core.config import ConfigError, ModelConfig
from kcp.core.char_ngrams import char_ngram_count, char_ngram_settings
from kcp.core.contract import MODALITIES

# model.cell -> its Keras layer class (rnn.py builds with it; layers.py's BidirectionalRNN too)
CELLS = {"simple": "SimpleRNN", "lstm": "LSTM", "gru": "GRU"}


@dataclass(frozen=True)
class ModelInputs:
    """The part of the data contract a model builder needs."""

    modality: str  # image | sequence | text | language
    shape: tuple  # one example: (H, W, C) image, (T, F) sequence, (T,) token ids (text, language: T = context)
    num_classes: int
    mean: tuple = ()  # per channel (images) or per feature (sequences); empty: no normalisation
    std: tuple = ()
    vocab_size: int = 0  # text: token ids are 0 (padding), 1 (out of vocabulary), 2..vocab_size-1;
    # language: 0 padding, 1 unknown, 2 document separator, real tokens from 3 (so at least 4 ids)
    input_name: str = "image"
    # text with character n-grams (data.char_ngrams): the input holds `shape[0]` token ids, then this many
    # n-gram ids in [0, char_ngram_buckets) (0 padding); `model_input` splits them
    char_ngram_length: int = 0
    char_ngram_buckets: int = 0

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality {self.modality!r} is not one of {', '.join(MODALITIES)}")
        expected_rank = {"image": 3, "sequence": 2, "text": 1, "language": 1}[self.modality]
        if len(self.shape) != expected_rank:
            raise ConfigError(f"input shape {tuple(self.shape)} does not fit modality {self.modality!r} "
                              f"(expected {expected_rank} dimensions)")
        if self.modality == "text" and self.vocab_size < 2:
            raise ConfigError(f"vocab_size {self.vocab_size} is too small for text input")
        if self.modality == "language" and self.vocab_size < 4:
            raise ConfigError(f"vocab_size {self.vocab_size} is too small for language input (ids 0-2 are reserved)")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes {self.num_classes} must be at least 2")
        if self.char_ngram_length and (self.modality != "text" or self.char_ngram_buckets < 2):
            raise ConfigError(f"character n-grams are for text with at least 2 buckets, not {self.modality} with "
                              f"{self.char_ngram_buckets}")

    @property
    def dtype(self) -> str:
        return "int32" if self.modality in ("text", "language") else "float32"

    @classmethod
    def from_contract(cls, contract) -> "ModelInputs":
        statistics = contract.statistics
        if contract.modality == "language":  # next-token prediction: one class per vocabulary id
            vocab_size = int(statistics["vocab_size"])
            return cls(modality="language", shape=(int(statistics["context_length"]),), num_classes=vocab_size,
                       vocab_size=vocab_size, input_name="tokens")
        text = contract.modality == "text"
        n, buckets, max_characters = char_ngram_settings(contract)
        return cls(
            modality=contract.modality,
            shape=(int(statistics["max_length"]),) if text else tuple(contract.input_shape),
            num_classes=contract.num_classes,
            mean=tuple(statistics.get("mean", ())),
            std=tuple(statistics.get("std", ())),
            vocab_size=int(statistics.get("vocab_size", 0)),
            input_name=contract.input_feature,
            char_ngram_length=char_ngram_count(n, max_characters) if n else 0,
            char_ngram_buckets=buckets,
        )

    @property
    def input_shape(self) -> tuple:
        """The shape of the model's Input: `shape`, plus the n-gram ids of text that has them."""
        return (self.shape[0] + self.char_ngram_length,) if self.char_ngram_length else tuple(self.shape)


def initializer_for(config: ModelConfig) -> str:
    """`model.initializer`, or the family's default: He for ReLU networks, Glorot otherwise."""
    return config.initializer or config.family.default_initializer


def model_input(spec: ModelInputs, config: ModelConfig):
    """The model's Input and the tensor the family's body starts from.

    Images and sequences pass through the online augmentation layers (images, training
    only) and a Normalization layer fixed at construction to the pipeline's mean/std
    (never adapted here), so training and serving use exactly the numbers the pipeline
    measured. Text stays as int token ids; families embed it themselves (with character n-grams,
    the tensor is the token ids alone, and char_ngrams.with_char_ngrams adds the n-grams before the head).
    Returns (inputs, tensor).
    """
    import keras

    inputs = keras.Input(shape=spec.input_shape, dtype=spec.dtype, name=spec.input_name)
    x = inputs[:, :spec.shape[0]] if spec.char_ngram_length else inputs
    if config.augment.enabled(spec.modality, spec.shape):
        if spec.modality != "image":
            raise ConfigError(f"model.augment: augmentation layers apply to images, not {spec.modality}")
        x = augmentation_layers(config, spec)(x)
    if spec.modality != "text" and spec.mean:
        mean, std = np.asarray(spec.mean, dtype=np.float64), np.asarray(spec.std, dtype=np.float64)
        scale = input_scale(std)
        if np.any(scale != 1.0):  # variances float32 cannot hold: those features divided by a power of ten first
            x = keras.layers.Rescaling(list(1.0 / scale), dtype="float32", name="prescale")(x)
            mean, std = mean / scale, std / scale
        # a feature constant in training (std 0) is centred, not divided by ~0 (scikit-learn's
        # StandardScaler does the same): else 5.001 against a trained 5.0 would be 10,000 std away.
        # float32 whatever the policy: under mixed_float16, a variance above 65504 (std 256) was inf
        variance = np.where(std > 0, np.square(std), 1.0)
        x = keras.layers.Normalization(axis=-1, mean=list(mean), variance=list(variance), dtype="float32",
                                       name="normalize")(x)
    return inputs, x


def input_scale(std) -> np.ndarray:
    """Per feature, 1 or the power of ten to divide it by before Normalization, for a std outside
    [1e-6, 1e15]. Above, its square, the layer's variance, leaves float32's range: series of values
    around 1e20 have a variance near 1e40, which float32 holds as inf, so every input became 0 (a
    model at chance) and the export failed writing the variance into its config. Below, the layer
    divides by at least its epsilon's 1e-7 and squashes the feature."""
    std = np.asarray(std, dtype=np.float64)
    outside = np.isfinite(std) & (std > 0) & ((std < 1e-6) | (std > 1e15))
    return np.where(outside, 10.0 ** np.round(np.log10(np.where(outside, std, 1.0))), 1.0)


def augmentation_layers(config: ModelConfig, spec: ModelInputs):
    """A Sequential of Keras random image layers from `model.augment` (inactive at inference)."""
    import keras

    augment, steps = config.augment, []
    if augment.flip != "none":
        steps.append(keras.layers.RandomFlip(augment.flip, name="augment_flip"))
    translation = augment.applied_translation(spec.modality, spec.shape)
    if translation:
        steps.append(keras.layers.RandomTranslation(translation, translation, name="augment_translation"))
    if augment.rotation:
        steps.append(keras.layers.RandomRotation(augment.rotation, name="augment_rotation"))
    if augment.zoom:
        steps.append(keras.layers.RandomZoom(augment.zoom, name="augment_zoom"))
    if augment.contrast:
        steps.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), name="augment_contrast"))
    return keras.Sequential(steps, name="augment")


def conv_pool_block(x, filters: int, config: ModelConfig, name: str):
    """Two 3x3 convolutions (batch normalization, ReLU) and a 2x2 max pool, layers `{name}_conv{i}`,
    `{name}_bn{i}`, `{name}_relu{i}`, `{name}_pool`: the image stems of the rnn and the transformer."""
    import keras

    for index in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                                name=f"{name}_conv{index}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{index}")(batch_norm(x, config, f"{name}_bn{index}"))
    return keras.layers.MaxPooling2D(2, padding="same", name=f"{name}_pool")(x)


def token_embedding(tokens, spec: ModelInputs, dim: int, *, mask_zero: bool, dropout: float = 0.0,
                    word_dropout: float = 0.0, name: str = "token_embedding"):
    """Embeds int token ids; id 0 is padding (masked for layers that support masks). With
    `word_dropout` (`model.word_dropout`), a `WordDropout` layer first turns that fraction of the
    real tokens into the out-of-vocabulary id in training. With `dropout`, a Dropout layer
    `embedding_dropout` follows (training only; it passes the mask on), as in keras-io's text
    classification from scratch (Dropout after the embedding)."""
    import keras

    if word_dropout > 0:
        from trainer.models.word_dropout import WordDropout  # Keras: imported when a model is built

        tokens = WordDropout(word_dropout, name="word_dropout")(tokens)
    x = keras.layers.Embedding(spec.vocab_size, dim, mask_zero=mask_zero, name=name)(tokens)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    return x


KERAS_BATCH_NORM_MOMENTUM = 0.99
START_WEIGHT = 0.01  # what the initial moving statistics (mean 0, variance 1) may weigh at the end


def batch_norm_momentum_for(training_steps: int) -> float:
    """The moving-statistics momentum for a run of `training_steps`: Keras' 0.99 unless the
    run is too short for it to forget the initial statistics.

    After T steps the initial (0, 1) statistics still weigh momentum**T: 0.99**69 = 0.50 for
    3 epochs of the digits, whose first test accuracy was then 0.55 at train 0.97. The momentum
    here makes that weight at most 1% (0.935 for 69 steps), so inference uses statistics of
    the last epochs' weights; runs of 459 steps or more keep 0.99.
    """
    return min(KERAS_BATCH_NORM_MOMENTUM, START_WEIGHT ** (1.0 / max(1, training_steps)))


def batch_norm(x, config: ModelConfig, name: str, epsilon: float = 1e-3):
    """BatchNormalization, synchronized across replicas when `model.sync_batch_norm` is true,
    with momentum `model.batch_norm_momentum` (the trainer fills it from the run's length).

    Without synchronization, each replica (and each worker of a cluster) keeps moving
    statistics of its own data only, and workers end with different models.
    """
    import keras

    momentum = KERAS_BATCH_NORM_MOMENTUM if config.batch_norm_momentum is None else config.batch_norm_momentum
    return keras.layers.BatchNormalization(axis=-1, momentum=momentum, epsilon=epsilon,
                                           synchronized=bool(config.sync_batch_norm), name=name)(x)


def classifier_head(x, num_classes: int, dropout: float, initializer: str = "glorot_uniform"):
    """Dropout, then a softmax Dense layer named `predictions` (float32 under mixed precision)."""
    import keras

    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    return keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=initializer,
                              dtype="float32", name="predictions")(x)
