"""The trainer's `tf.data` input: the contract's shards as (float inputs, labels) batches."""

from __future__ import annotations

from kcp.config import TrainConfig
from pipeline import contract as contract_lib


def make_dataset(contract, data_dir: str, split: str, config: TrainConfig, *, training: bool):
    """Batches of `(float32 inputs, int64 labels)` for `model.fit` / `model.evaluate`.

    Training batches are shuffled (files and records, reseeded each epoch); evaluation
    batches keep the file order, so metrics and predictions line up with the shards.
    """
    import tensorflow as tf

    dataset = contract_lib.read_split(
        contract, data_dir, split, config.batch_size,
        shuffle_buffer=config.shuffle_buffer if training else 0,
        seed=config.seed,
        deterministic=not training,
        cache=config.cache,
    )
    input_dtype = tf.int32 if contract.modality == "text" else tf.float32  # token ids stay integers
    dataset = dataset.map(lambda inputs, labels, keys: (tf.cast(inputs, input_dtype), labels),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
