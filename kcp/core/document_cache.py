"""A document cache for language models: the network mixed with the text's own earlier n-grams.

A network with a context of a few hundred tokens forgets the start of a long document; a
compressor such as xz does not. The cache gives back what the document has said so far (a cache
language model, Kuhn and De Mori 1990; for source code, Tu et al. 2014): for each order n in
CACHE_ORDERS, how often the target followed the same n - 1 tokens earlier in the same text, over
how often those tokens occurred there. The next-token probability is

    (1 - sum(weights)) x network + sum over n of weight_n x (cache_n, or the network where the
                                                          n - 1 tokens had not occurred before)

Causal: each target's probability uses only the tokens before it, so an arithmetic coder could
reach these bits. The trainer fits the weights on the validation split's documents at the end of
a language run (`fit_weights`, over CACHE_GRID) and writes them to metrics.json; the export's
`score` signature computes the same mixture in the graph (`mixed_log_probabilities_graph`), and
`kcp validate` checks it against this module's NumPy reference (`WindowScorer` for the network). Generation samples from the
network alone.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

CACHE_ORDERS = (1, 2, 3)  # unigram, bigram, trigram counts of the text's own earlier tokens
# weights tried per order; a grid point whose weights sum to 1 or more is left out
CACHE_GRID = ((0.0, 0.01, 0.02, 0.05), (0.0, 0.1, 0.2, 0.3, 0.4), (0.0, 0.1, 0.2, 0.3, 0.4))
NO_CACHE = (0.0,) * len(CACHE_ORDERS)
FIT_TOKENS = 2**18  # tokens of whole documents the fit scores per split (the first documents, in shard order)


def document_cache(ids, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(probability, seen) per target of ids[1:] for one cache order: how often the target followed
    the same `order - 1` tokens earlier in `ids`, over how often those tokens occurred there;
    `seen` is False where they had not occurred before (or the text is too short for them)."""
    ids = [int(token) for token in ids]
    targets = ids[1:]
    probability, seen = np.zeros(len(targets)), np.zeros(len(targets), bool)
    contexts: dict = {}
    followers: dict = {}
    for position, target in enumerate(targets):
        if position + 1 < order - 1:
            continue
        context = tuple(ids[position + 2 - order:position + 1]) if order > 1 else ()
        count = contexts.get(context, 0)
        if count:
            probability[position] = followers.get(context + (target,), 0) / count
            seen[position] = True
        contexts[context] = count + 1
        followers[context + (target,)] = followers.get(context + (target,), 0) + 1
    return probability, seen


def document_caches(ids) -> list[tuple[np.ndarray, np.ndarray]]:
    """`document_cache` of every order in CACHE_ORDERS."""
    return [document_cache(ids, order) for order in CACHE_ORDERS]


def mixed_log_probabilities(network: np.ndarray, caches: list, weights) -> np.ndarray:
    """Natural log-probabilities (float64) of the targets under the mixture of the module
    docstring: `network` holds the network's log-probabilities of the targets, `caches` the
    `document_caches` of the same ids. Weights of 0 give back `network`."""
    network = np.asarray(network, np.float64)
    with np.errstate(divide="ignore"):  # log(0): the cache has never seen the target after its context
        terms = [np.full_like(network, math.log(1.0 - sum(weights)) if sum(weights) < 1 else -np.inf) + network]
        for weight, (probability, seen) in zip(weights, caches):
            if weight > 0:
                terms.append(math.log(weight) + np.where(seen, np.log(probability), network))
    return np.logaddexp.reduce(np.stack(terms), axis=0)


def grid() -> list[tuple]:
    """The CACHE_GRID points whose weights sum to less than 1."""
    return [weights for weights in itertools.product(*CACHE_GRID) if sum(weights) < 1]


def fit_weights(documents: list) -> tuple:
    """The grid point with the fewest bits on `documents` [(network log-probabilities of the
    targets, their `document_caches`)]; NO_CACHE wins ties, so a cache that does not help is off."""
    def nats(weights) -> float:
        return -sum(float(mixed_log_probabilities(network, caches, weights).sum()) for network, caches in documents)
    best, best_nats = NO_CACHE, nats(NO_CACHE)
    for weights in grid():
        candidate = nats(weights)
        if candidate < best_nats - 1e-9:
            best, best_nats = weights, candidate
    return best


def trained_weights(metrics: dict) -> tuple:
    """The weights a language run's metrics.json holds ("document_cache"), NO_CACHE where it has none."""
    weights = (metrics.get("document_cache") or {}).get("weights")
    return tuple(float(weight) for weight in weights) if weights else NO_CACHE


class WindowScorer:
    """The Keras language model's natural log-probability of each target of `ids[1:]` given what
    precedes it in its window: `WindowScorer(model, context)(ids)`, float64 (len(ids) - 1,).

    The inputs `ids[:-1]` are cut into windows of `context`, the context starting afresh in each
    (as the export's `score` signature does), the last window padded on the right (the model is
    causal: padding after a position does not change it), and run `batch_windows` at a time.
    Float32 log softmax, as the export computes it; one traced function under TensorFlow (about
    1.7x faster than eager calls on 2 CPU cores), eager calls on another backend."""

    def __init__(self, model, context: int, batch_windows: int = 16):
        import keras

        self.context, self.batch_windows = context, batch_windows

        def score(inputs, targets):
            logits = model(inputs, training=False)
            log_probabilities = keras.ops.log_softmax(keras.ops.cast(logits, "float32"), axis=-1)
            return keras.ops.take_along_axis(log_probabilities, keras.ops.expand_dims(targets, -1), axis=-1)[..., 0]

        self.score = score
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            self.score = tf.function(score, input_signature=[tf.TensorSpec([None, context], tf.int32)] * 2)

    def __call__(self, ids) -> np.ndarray:
        from kcp.core.contract import LANGUAGE_PAD

        inputs, targets = np.asarray(ids[:-1], np.int32), np.asarray(ids[1:], np.int32)
        windows = -(-len(inputs) // self.context)
        padded = np.full((2, windows * self.context), LANGUAGE_PAD, np.int32)
        padded[0, :len(inputs)], padded[1, :len(targets)] = inputs, targets
        padded = padded.reshape(2, windows, self.context)
        scores = [np.asarray(self.score(padded[0, start:start + self.batch_windows],
                                        padded[1, start:start + self.batch_windows])).reshape(-1)
                  for start in range(0, windows, self.batch_windows)]
        return np.concatenate(scores)[:len(targets)].astype(np.float64)


# --- in the graph (the export's score signature) -------------------------------------------

def earlier_counts(keys):
    """int64 keys (rows, width) -> int32 (rows, width): how many earlier positions of the same
    row hold the same key. A stable sort of (row, key) keeps positions in order within a key, so
    a position's rank inside its run of equal keys is its count: O(n log n), not n x n."""
    import tensorflow as tf

    rows, width = tf.shape(keys, out_type=tf.int64)[0], tf.shape(keys, out_type=tf.int64)[1]
    _, dense = tf.unique(tf.reshape(keys, [-1]), out_idx=tf.int64)
    combined = tf.range(rows)[:, None] * (rows * width) + tf.reshape(dense, tf.stack([rows, width]))
    combined = tf.reshape(combined, [-1])
    order = tf.argsort(combined, stable=True)
    ordered = tf.gather(combined, order)
    rank = tf.range(tf.size(ordered, out_type=tf.int32)) - tf.searchsorted(ordered, ordered, side="left",
                                                                             out_type=tf.int32)
    counts = tf.scatter_nd(order[:, None], rank, tf.shape(ordered, out_type=tf.int32))
    return tf.reshape(counts, tf.shape(keys))


def mixed_log_probabilities_graph(sequences, network, weights, vocabulary_size: int):
    """`mixed_log_probabilities` in TensorFlow for a batch: `sequences` int32 (rows, width + 1),
    each a text's ids (padding after its end does not change its targets), `network` float32
    (rows, width) the network's log-probabilities of sequences[:, 1:]. `weights` are Python
    floats (constants of the graph); orders of weight 0 are not computed."""
    import tensorflow as tf

    if not any(weights):
        return network
    base = vocabulary_size + 1  # ids and one more: the mark before the text, which no id equals
    if base ** max(CACHE_ORDERS) >= 2**62:
        raise ValueError(f"a vocabulary of {vocabulary_size} is too large for {max(CACHE_ORDERS)}-gram keys")
    sequences = tf.cast(sequences, tf.int64)
    width = tf.shape(sequences)[1] - 1
    left = 1.0 - sum(weights)
    terms = [tf.math.log(tf.constant(left, tf.float32)) + network]
    for order, weight in zip(CACHE_ORDERS, weights):
        if weight <= 0:
            continue
        # target p's n-gram is sequences[p + 2 - order .. p + 1]: `order - 1` marks before the text
        marked = tf.pad(sequences, [[0, 0], [order - 1, 0]], constant_values=vocabulary_size)
        context = tf.zeros_like(network, tf.int64)
        for offset in range(order - 1):
            context = context * base + marked[:, 1 + offset:1 + offset + width]
        gram = context * base + marked[:, order:order + width]
        followers, occurrences = earlier_counts(gram), earlier_counts(context)
        seen = occurrences > 0
        cache = tf.math.log(tf.cast(followers, tf.float32) / tf.cast(tf.maximum(occurrences, 1), tf.float32))
        terms.append(tf.math.log(tf.constant(weight, tf.float32)) + tf.where(seen, cache, network))
    return tf.reduce_logsumexp(tf.stack(terms), axis=0)
