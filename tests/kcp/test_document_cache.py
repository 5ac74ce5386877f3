"""The document cache of language models (kcp/core/document_cache.py): its counts against a
brute-force count, the mixture, the weights' fit, and the graph's sort-based counts against the
NumPy reference."""

import math

import numpy as np
import pytest
import tensorflow as tf

from kcp.core import document_cache


def brute_force_cache(ids: list[int], order: int) -> tuple[list, list]:
    """(probability, seen) per target of ids[1:], by rescanning every earlier position: the
    test's own arithmetic."""
    probability, seen = [], []
    for target_index in range(1, len(ids)):
        context = ids[target_index - order + 1:target_index] if order > 1 else []
        if target_index - order + 1 < 0:
            probability.append(0.0)
            seen.append(False)
            continue
        earlier = [index for index in range(max(1, order - 1), target_index)  # earlier targets
                   if ids[index - order + 1:index] == context]
        followed = [index for index in earlier if ids[index] == ids[target_index]]
        probability.append(len(followed) / len(earlier) if earlier else 0.0)
        seen.append(bool(earlier))
    return probability, seen


def test_the_cache_counts_what_followed_the_same_tokens_earlier_in_the_text():
    ids = [1, 5, 6, 5, 6, 5, 7, 1]
    bigram, seen = document_cache.document_cache(ids, 2)
    # targets 5 6 5 6 5 7 1: the second 6 after 5 and 5 after 6 repeat the first; 7 after 5 is new
    assert seen.tolist() == [False, False, False, True, True, True, False]
    assert bigram.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    unigram, seen = document_cache.document_cache(ids, 1)
    assert seen.tolist() == [False] + [True] * 6
    assert unigram[3] == pytest.approx(1 / 3)  # ids[4] = 6 among the earlier targets 5, 6, 5
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(2, 6, size=int(rng.integers(1, 40))).tolist()
        for order in document_cache.CACHE_ORDERS:
            probability, seen = document_cache.document_cache(ids, order)
            expected_probability, expected_seen = brute_force_cache(ids, order)
            assert seen.tolist() == expected_seen
            np.testing.assert_allclose(probability, expected_probability)


def test_the_mixture_gives_the_cache_its_weight_only_where_it_has_seen_the_context():
    ids = [1, 5, 6, 5, 6, 1]
    network = np.log([0.5, 0.25, 0.1, 0.2, 0.05])
    caches = document_cache.document_caches(ids)
    np.testing.assert_array_equal(document_cache.mixed_log_probabilities(network, caches, document_cache.NO_CACHE),
                                  network)
    mixed = document_cache.mixed_log_probabilities(network, caches, (0.1, 0.3, 0.0))
    p = np.exp(network)
    # target 3 (ids[4] = 6): unigram 1/3 (5, 6, 5), bigram after 5: 6 once in one
    assert math.exp(mixed[3]) == pytest.approx(0.6 * p[3] + 0.1 / 3 + 0.3 * 1.0)
    assert math.exp(mixed[0]) == pytest.approx(p[0])  # nothing seen before the first target
    # the last target (1) never occurred, and 6 was followed by 5 before: both caches give it 0
    assert math.exp(mixed[4]) == pytest.approx(0.6 * p[4])


def test_the_fit_turns_the_cache_on_for_repeating_text_and_leaves_it_off_otherwise():
    uniform = math.log(1 / 50)
    repeating = [1] + [10, 11, 12, 13] * 30 + [1]
    fitted = document_cache.fit_weights([(np.full(len(repeating) - 1, uniform),
                                          document_cache.document_caches(repeating))])
    assert fitted in document_cache.grid() and fitted[2] == max(document_cache.CACHE_GRID[2])
    never_repeats = [1, *range(2, 120), 1]
    confident = np.full(len(never_repeats) - 1, math.log(0.9))  # a network that already knows the text
    assert document_cache.fit_weights([(confident, document_cache.document_caches(never_repeats))]) \
        == document_cache.NO_CACHE


def test_earlier_counts_rank_equal_keys_within_each_row():
    keys = tf.constant([[3, 1, 3, 3, 1], [3, 3, 0, 0, 0]], tf.int64)
    assert document_cache.earlier_counts(keys).numpy().tolist() == [[0, 0, 1, 2, 1], [0, 1, 0, 1, 2]]


@pytest.mark.parametrize("weights", [(0.02, 0.2, 0.4), (0.0, 0.3, 0.0), (0.05, 0.0, 0.4), (0.0, 0.0, 0.0)])
def test_the_graph_mixture_equals_the_numpy_reference_on_a_ragged_batch(weights):
    rng = np.random.default_rng(1)
    vocabulary = 12
    rows = [rng.integers(2, vocabulary, size=size).tolist() for size in (5, 40, 1, 2, 300)]
    width = max(len(row) for row in rows) - 1
    sequences = np.zeros((len(rows), width + 1), np.int32)
    network = np.log(rng.dirichlet(np.ones(vocabulary), size=(len(rows), width)))
    for index, row in enumerate(rows):
        sequences[index, :len(row)] = row
    picked = np.take_along_axis(network, sequences[:, 1:, None], -1)[..., 0]
    graph = document_cache.mixed_log_probabilities_graph(tf.constant(sequences), tf.constant(picked, tf.float32),
                                                         weights, vocabulary).numpy()
    for index, row in enumerate(rows):
        scored = len(row) - 1
        expected = document_cache.mixed_log_probabilities(picked[index, :scored], document_cache.document_caches(row),
                                                          weights)
        np.testing.assert_allclose(graph[index, :scored], expected, atol=1e-5)


def test_trained_weights_read_metrics_and_default_to_no_cache():
    assert document_cache.trained_weights({}) == document_cache.NO_CACHE
    assert document_cache.trained_weights({"document_cache": {"weights": [0.02, 0.2, 0.4]}}) == (0.02, 0.2, 0.4)
