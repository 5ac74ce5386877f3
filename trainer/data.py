"""The trainer's `tf.data` input: the contract's shards as (model inputs, labels) batches."""

from __future__ import annotations

import tensorflow as tf

from kcp.core.config import TrainConfig
from kcp.core import examples as example_lib


def make_dataset(contract, data_dir: str, split: str, config: TrainConfig, *, global_batch: int, training: bool,
                 drop_remainder: bool = False, one_hot: bool = False, workers: int = 1, vectorizer=None):
    """Batches of `(inputs, labels)` for `model.fit` / `model.evaluate`, batched globally.

    Under a strategy, Keras splits each global batch across the replicas. Training batches
    are shuffled (files and records, reseeded each epoch; in `train.deterministic` mode the
    order is fixed by the seed); evaluation batches keep the file order, so metrics and
    predictions line up with the shards. Images and sequences become float32 (the model
    normalises them); text goes through `vectorizer` (the contract's TextVectorization) to
    int32 ids; labels become one-hot when label smoothing needs it.
    """
    dataset = example_lib.read_split(
        contract, data_dir, split, global_batch,
        shuffle_buffer=config.shuffle_buffer if training else 0,
        seed=config.seed,
        deterministic=config.deterministic or not training,
        cache=config.cache,
        drop_remainder=drop_remainder,
    )
    num_classes = contract.num_classes
    language = contract.modality == "language"

    def to_model(inputs, labels, keys):
        if language:  # (batch, context + 1) ids -> inputs and next-token targets, (batch, context) each
            return example_lib.language_pairs(tf.cast(inputs, tf.int32))
        labels = tf.one_hot(labels, num_classes) if one_hot else labels
        if vectorizer is not None:  # text: raw strings -> token ids, as the export does in its graph
            return tf.cast(vectorizer(inputs), tf.int32), labels
        return tf.cast(inputs, tf.float32), labels

    dataset = dataset.map(to_model, num_parallel_calls=tf.data.AUTOTUNE, deterministic=config.deterministic or not training)
    if workers > 1:
        # Each worker reads its own files when there are enough of them; otherwise every
        # worker reads everything and keeps its share of the batches.
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy
        names = [split] if isinstance(split, str) else split
        enough_files = sum(contract.splits[name].num_shards for name in names) >= workers
        options.experimental_distribute.auto_shard_policy = policy.FILE if enough_files else policy.DATA
        dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE)
