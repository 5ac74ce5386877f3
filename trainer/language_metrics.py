"""Language-model metrics: nats per target token (padding left out), perplexity and bits per byte,
and the document cache's fit at the end of a run.

Bits per byte compare across tokenizers: the summed loss of a split over the bytes its target
tokens encode (the data contract's `target_bytes`; each bpe token counts its own bytes), in bits.
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
import tensorflow as tf

from kcp.core import contract as contract_lib
from kcp.core import document_cache
from kcp.core import examples as example_lib

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="kcp")
class NatsPerToken(keras.metrics.Metric):
    """Cross-entropy in nats per target token, padding (LANGUAGE_PAD) left out: the sum over
    every real token of the epoch divided by their count, so unlike the loss (a mean of per-batch
    means) it does not depend on how padding falls into batches. From logits."""

    def __init__(self, name: str = "nats_per_token", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float64", aggregation="sum",
                                       name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float64", aggregation="sum",
                                       name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        targets = keras.ops.cast(y_true, "int32")
        real = keras.ops.not_equal(targets, contract_lib.LANGUAGE_PAD)
        losses = keras.ops.sparse_categorical_crossentropy(targets, keras.ops.cast(y_pred, "float32"), from_logits=True)
        losses = keras.ops.where(real, losses, keras.ops.zeros_like(losses))
        self.total.assign_add(keras.ops.cast(keras.ops.sum(losses), "float64"))
        self.count.assign_add(keras.ops.cast(keras.ops.sum(keras.ops.cast(real, "int32")), "float64"))

    def result(self):
        return keras.ops.cast(keras.ops.divide_no_nan(self.total, self.count), "float32")


def language_split_metrics(nats_per_token: float, contract, splits) -> dict:
    """perplexity and bits_per_byte of a split (or several fitted as one) from its nats per token."""
    return {"perplexity": float(math.exp(min(nats_per_token, 700.0))),
            "bits_per_byte": bits_per_byte(nats_per_token, contract, splits)}


def bits_per_byte(nats_per_token: float, contract, splits) -> float:
    """Bits per byte of the text behind `splits` (a name or a list): nats/token x tokens/bytes / ln 2."""
    names = [splits] if isinstance(splits, str) else list(splits)
    if len(names) == 1:
        return float(contract_lib.bits_per_byte(nats_per_token, contract, names[0]))
    # several splits fitted as one: the token-weighted mean of each split's conversion
    statistics = contract.statistics
    encoded = statistics.get("target_bytes", statistics["bytes"])
    nats = nats_per_token * sum(statistics["tokens"][name] for name in names)
    return float(nats / math.log(2) / sum(encoded[name] for name in names))


def split_documents(contract, data_dir: str, split: str, max_tokens: int) -> list[list[int]]:
    """The documents of a split as lists of ids, rebuilt from its shards: a shard is one packing
    group's stream of documents, each followed by the separator, cut into blocks in order. Whole
    documents, in shard order, until `max_tokens` ids are taken (at least one document)."""
    compression = example_lib.record_compression(contract)
    separator, pad = contract_lib.LANGUAGE_SEPARATOR, contract_lib.LANGUAGE_PAD
    documents, taken = [], 0
    for path in sorted(contract.split_files(data_dir, split)):
        blocks = [example_lib.parse_examples(contract, serialized)[0].numpy().reshape(-1)
                  for serialized in tf.data.TFRecordDataset(path, compression_type=compression).batch(256)]
        stream = np.concatenate(blocks) if blocks else np.zeros(0, np.int32)
        ends = np.flatnonzero(stream == separator)
        for start, end in zip(np.concatenate([[0], ends[:-1] + 1]), ends):
            ids = [int(token) for token in stream[start:end] if token != pad]
            if not ids:
                continue
            if documents and taken + len(ids) > max_tokens:
                return documents
            documents.append(ids)
            taken += len(ids)
    return documents


def fit_document_cache(model, contract, run_dir: str, data_dir: str, held_out: list[str]) -> dict:
    """Fits the document cache's weights (kcp/core/document_cache.py) on the validation split's
    documents and measures the model with and without it on each held-out split, as the export's
    `score` computes it: each document after a separator and followed by one, the network in
    windows of the context, the cache over the whole document. Returns metrics.json's
    "document_cache": the weights, and per split its documents, tokens, bytes (UTF-8 and one per
    separator), network_bits_per_byte and bits_per_byte. Without a held-out validation split
    the weights stay 0 (the cache is off): fitting them on trained data would overrate it."""
    context = int(contract.statistics["context_length"])
    tokenizer = contract_lib.language_tokenizer(contract)
    vocabulary = contract_lib.language_vocabulary(run_dir, contract)
    scorer = document_cache.WindowScorer(model, context)

    def scored(split: str) -> list[tuple]:
        documents = []
        for ids in split_documents(contract, data_dir, split, document_cache.FIT_TOKENS):
            sequence = [contract_lib.LANGUAGE_SEPARATOR, *ids, contract_lib.LANGUAGE_SEPARATOR]
            size = len(contract_lib.decode_language(ids, tokenizer, vocabulary).encode("utf-8")) + 1
            documents.append((scorer(sequence),
                              document_cache.document_caches(sequence), size))
        return documents

    splits = {split: scored(split) for split in held_out}
    result = {"orders": list(document_cache.CACHE_ORDERS), "weights": list(document_cache.NO_CACHE),
              "fitted_on": None, "fit_tokens": document_cache.FIT_TOKENS}
    if "validation" in splits:
        weights = document_cache.fit_weights([(network, caches) for network, caches, _ in splits["validation"]])
        result.update(weights=list(weights), fitted_on="validation")
    for split, documents in splits.items():
        size = sum(bytes_ for _, _, bytes_ in documents)
        network = sum(float(scores.sum()) for scores, _, _ in documents)
        mixed = sum(float(document_cache.mixed_log_probabilities(scores, caches, result["weights"]).sum())
                    for scores, caches, _ in documents)
        result[split] = {"documents": len(documents), "tokens": sum(len(scores) for scores, _, _ in documents),
                         "bytes": size, "network_bits_per_byte": -network / math.log(2) / size,
                         "bits_per_byte": -mixed / math.log(2) / size}
        log.info("train: %s documents, bits per byte %.4f, with the document cache %.4f (weights %s)",
                 split, result[split]["network_bits_per_byte"], result[split]["bits_per_byte"], result["weights"])
    return result
