"""The trainer's `tf.data` input: the contract's shards as (model inputs, labels) batches."""

from __future__ import annotations

import tensorflow as tf

from kcp.core.config import TrainConfig
from kcp.core import examples as example_lib


def make_dataset(contract, data_dir: str, split: str, config: TrainConfig, *, global_batch: int, training: bool,
                 drop_remainder: bool = False, one_hot: bool = False, workers: int = 1, vectorizer=None,
                 files_of: tuple[int, int] | None = None):
    """Batches of `(inputs, labels)` for `model.fit` / `model.evaluate`, batched globally.

    Under a strategy, Keras splits each global batch across the replicas. Training batches
    are shuffled (files and records, reseeded each epoch; in `train.deterministic` mode the
    order is fixed by the seed); evaluation batches keep the file order, so metrics and
    predictions line up with the shards. Images and sequences become float32 (the model
    normalises them); text goes through `vectorizer` (the contract's TextVectorization) to
    int32 ids; labels become one-hot when label smoothing needs it.

    Under `workers` > 1 every worker reads the whole split and keeps its share of each global
    batch, so all workers take the same number of steps (a worker that ran out first would
    leave the others waiting in a collective); their orders must then agree record for record
    (or some records would be trained on twice an epoch and others never), so they are
    deterministic. `files_of` is `per_worker_dataset`'s.
    """
    deterministic = config.deterministic or not training or workers > 1
    dataset = example_lib.read_split(
        contract, data_dir, split, global_batch,
        shuffle_buffer=config.shuffle_buffer if training else 0,
        seed=config.seed,
        deterministic=deterministic,
        cache=config.cache,
        drop_remainder=drop_remainder,
        files_of=files_of,
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

    dataset = dataset.map(to_model, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if workers > 1:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE)


def files_split_evenly(contract, data_dir: str, split, workers: int, tolerance: float = 0.1,
                       records_per_file: int = 20) -> bool:
    """Whether giving each of `workers` every `workers`-th file of `split` (a name or a list of
    names) gives each about the same number of records (within `tolerance`), judged from the
    contract's counts: a split's files hold about equal shares of it, records going to files by
    their key's hash. Under `records_per_file` a file could hold none (and a worker whose files
    are all empty would stop its epoch while the others wait for it), so then: no."""
    sizes = []
    for name in [split] if isinstance(split, str) else split:
        files = contract.split_files(data_dir, name)
        if files and contract.splits[name].count < records_per_file * len(files):
            return False
        sizes += [contract.splits[name].count / len(files)] * len(files) if files else []
    shares = [sum(sizes[index::workers]) for index in range(workers)]
    return min(shares) > 0 and max(shares) <= (1 + tolerance) * min(shares)


def per_worker_dataset(strategy, contract, data_dir: str, split, config: TrainConfig, *, global_batch: int, **kwargs):
    """Training batches under a multi-worker strategy from each worker's own files: each input
    pipeline reads every N-th file (of N pipelines) and repeats them without end, so that the
    workers never run out at different steps; `model.fit` needs `steps_per_epoch`. Only where
    `files_split_evenly`: a worker with fewer records would see each of them more often."""
    def dataset_fn(context: tf.distribute.InputContext):
        return make_dataset(contract, data_dir, split, config, training=True,
                            global_batch=context.get_per_replica_batch_size(global_batch),
                            files_of=(context.input_pipeline_id, context.num_input_pipelines), **kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn)
