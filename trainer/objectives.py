"""What `model.compile` gets: the optimizer of `train.optimizer`, and the loss and metrics
for the contract's labels (sparse class ids, one-hot under label smoothing, next tokens)."""

from __future__ import annotations

import keras

from kcp.core import contract as contract_lib
from kcp.core.config import ConfigError, TrainConfig
from trainer.language_metrics import NatsPerToken


def make_optimizer(config: TrainConfig, rate, decay_matrices_only: bool = False, variables=()):
    """The optimizer named by `train.optimizer` with learning rate (or schedule) `rate`. With
    `decay_matrices_only`, weight decay spares the vectors among `variables` (biases, LayerNorm
    scales and offsets), as GPT-2/nanoGPT do; matrices, embeddings included, decay."""
    optimizer = _optimizer(config, rate)
    if decay_matrices_only and config.weight_decay:
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) < 2])
    return optimizer


def _optimizer(config: TrainConfig, rate):
    decay = config.weight_decay or None
    common = {"weight_decay": decay, "global_clipnorm": config.clip_norm or None}
    name = config.optimizer
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else config.momentum
        return keras.optimizers.SGD(rate, momentum=momentum, nesterov=name == "nesterov", **common)
    if name == "adagrad":
        return keras.optimizers.Adagrad(rate, **common)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(rate, **common)
    if name == "adam":
        return keras.optimizers.Adam(rate, **common)
    if name == "adamw":
        return keras.optimizers.AdamW(rate, **{**common, "weight_decay": config.weight_decay})
    raise ValueError(f"train.optimizer: {name!r} is not supported")


def one_hot_labels(config: TrainConfig) -> bool:
    """Labels are sparse class ids, unless label smoothing needs one-hot ones."""
    return config.label_smoothing > 0


def loss_and_metrics(config: TrainConfig, num_classes: int, modality: str = "image"):
    """The loss for the labels of `one_hot_labels`; top-5 accuracy above 5 classes. New objects
    on every call: a model's metrics hold its own state. Language: next-token cross-entropy from
    logits, padding ignored (separators are targets too), and `nats_per_token`."""
    if modality == "language":
        if config.label_smoothing:
            raise ConfigError("train.label_smoothing: not supported for language models; set it to 0")
        return (keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=contract_lib.LANGUAGE_PAD),
                [NatsPerToken()])
    one_hot = one_hot_labels(config)
    if one_hot:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    metrics = ["accuracy"]
    if num_classes > 5:
        top5 = keras.metrics.TopKCategoricalAccuracy if one_hot else keras.metrics.SparseTopKCategoricalAccuracy
        metrics.append(top5(k=5, name="top5_accuracy"))
    return loss, metrics
