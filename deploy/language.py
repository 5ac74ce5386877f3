"""The language signatures of an export (a gpt run): `generate` and `score`, their tf.functions,
the in-graph codec, and the test texts that validation and warmup requests use. deploy/export.py
puts them into the SavedModel; `kcp generate` and the report run the same `generate` function.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers

import numpy as np
import tensorflow as tf

from kcp.core import contract as contract_lib
from kcp.core import document_cache
from kcp.core import examples as example_lib
from kcp.core.errors import UserError

log = logging.getLogger("kcp.generate")

GENERATE_SPECS = {"prompts": tf.TensorSpec([None], tf.string, name="prompts"),
                  "max_new_tokens": tf.TensorSpec([], tf.int32, name="max_new_tokens"),
                  "temperature": tf.TensorSpec([], tf.float32, name="temperature"),
                  "top_k": tf.TensorSpec([], tf.int32, name="top_k"),
                  "top_p": tf.TensorSpec([], tf.float32, name="top_p"),
                  "seed": tf.TensorSpec([], tf.int32, name="seed")}


def generation_lengths(context: int) -> list[int]:
    """The static lengths the generate signature samples: 1, 2, 4, ... and context - 1.

    The sampler's output length is static; a request's `max_new_tokens` runs the shortest of
    these that is long enough and keeps its first `max_new_tokens` ids (the same ids: sampling
    is keyed by the seed and each new token's index). The prompt keeps its last
    `context - max_new_tokens` ids, the request's, not the length's (`wanted` in trainer/generate.py)."""
    lengths, length = [], 1
    while length < context - 1:
        lengths.append(length)
        length *= 2
    return lengths + [context - 1]


SCORE_CHUNK_FLOATS = 2**22  # the logits `score` holds at once (16 MB of float32)


def generation_length(max_new_tokens: int, context: int) -> int:
    """The length of `generation_lengths` that a request for `max_new_tokens` runs."""
    return next(length for length in generation_lengths(context) if length >= max_new_tokens)


def language_functions(model, contract, encoder, decoder, generate_tokens, lengths=None,
                       cache_weights=document_cache.NO_CACHE) -> dict:
    """The language signatures as tf.functions: {"generate", "score", "serving_default" (= score)}.

    generate(prompts: string [N], max_new_tokens, temperature, top_k, top_p, seed: scalars)
        -> completions: string [N]. Each prompt is encoded in the graph after a separator (the
        start of a document), `generate_tokens` (the gpt family's cached sampler, passed in by
        the caller: deploy imports no trainer code) samples the new ids, mapped over the prompts
        with tf.map_fn, and the completion stops at the first separator (the end of the document).
    score(texts: string [N]) -> log_probability: float32 [N], network_log_probability: float32 [N],
        tokens: int32 [N]: the natural log-probability of each text's tokens followed by the
        separator, given a separator before them. The network sees them in windows of the
        context (the model's own block length: the context starts afresh every `context`
        tokens, as in training); `log_probability` mixes it with the text's document cache by
        `cache_weights` (the trainer's fit, kcp/core/document_cache.py), which sees the whole
        text; `network_log_probability` is the network's alone. `tokens` counts the scored ids.
    `kcp generate` calls the same `generate` function, built on model.keras, so it prints what
    the served signature answers for the same seed; it passes only the one length its request
    runs (`lengths`), which spares tracing the others (the same branch, the same ids).
    """
    context = int(contract.statistics["context_length"])
    lengths = lengths or generation_lengths(context)
    separator, pad = contract_lib.LANGUAGE_SEPARATOR, contract_lib.LANGUAGE_PAD
    vocabulary_size = int(model.output_shape[-1])

    def with_separators(texts, before: bool, after: bool):
        ids = tf.cast(encoder(texts), tf.int32)  # ragged (N, tokens)
        mark = tf.RaggedTensor.from_tensor(tf.fill([ids.nrows(), 1], tf.constant(separator, tf.int32)))
        return tf.concat([part for part, wanted in ((mark, before), (ids, True), (mark, after)) if wanted], axis=1)

    def generate(prompts, max_new_tokens, temperature, top_k, top_p, seed):
        checks = [tf.debugging.assert_greater_equal(max_new_tokens, 1, message="max_new_tokens must be at least 1"),
                  tf.debugging.assert_less_equal(max_new_tokens, context - 1,
                                                 message=f"max_new_tokens must be at most {context - 1} (the context "
                                                         f"is {context})"),
                  tf.debugging.assert_non_negative(temperature, message="temperature must be 0 or more"),
                  tf.debugging.assert_non_negative(top_k, message="top_k must be 0 (off) or more"),
                  tf.debugging.assert_greater(top_p, 0.0, message="top_p must be above 0"),
                  tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be at most 1")]
        with tf.control_dependencies(checks):
            chosen = tf.searchsorted(tf.constant(lengths, tf.int32), tf.reshape(max_new_tokens, [1]))[0]

        def complete(prompt):  # (tokens,) -> (context - 1,) new ids, padded
            def run(length):
                new = generate_tokens(model, prompt, length, temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed, wanted=max_new_tokens)
                return tf.pad(tf.cast(new, tf.int32), [[0, context - 1 - length]])
            return tf.switch_case(chosen, [functools.partial(run, length) for length in lengths])

        new = tf.map_fn(complete, with_separators(prompts, before=True, after=False),
                        fn_output_signature=tf.TensorSpec([context - 1], tf.int32))  # (N, context - 1)
        wanted = tf.range(context - 1)[None, :] < max_new_tokens
        before_end = tf.math.cumsum(tf.cast(tf.equal(new, separator), tf.int32), axis=1) == 0
        return {"completions": decoder(tf.where(wanted & before_end, new, pad))}

    def picked_log_probabilities(inputs, targets):  # (windows, context) each -> float32 (windows, context)
        # SCORE_CHUNK_FLOATS of logits at a time, one chunk after another: the whole text's logits at
        # once would take (tokens x vocabulary) floats, about 6 KB a token for a 258-byte vocabulary
        count = tf.shape(inputs)[0]
        chunk = tf.minimum(count, max(1, SCORE_CHUNK_FLOATS // (context * vocabulary_size)))
        chunks = (count + chunk - 1) // chunk
        padding = [[0, chunks * chunk - count], [0, 0]]

        def one(pair):
            logits = model(pair[0], training=False)  # (chunk, context, vocab)
            return tf.gather(tf.nn.log_softmax(tf.cast(logits, tf.float32)), pair[1], batch_dims=2)

        split = [tf.reshape(tf.pad(part, padding, constant_values=pad), tf.stack([chunks, chunk, context]))
                 for part in (inputs, targets)]
        picked = tf.map_fn(one, tuple(split), parallel_iterations=1,
                           fn_output_signature=tf.TensorSpec([None, context], tf.float32))
        return tf.reshape(picked, [-1, context])[:count]

    def score(texts):
        sequences = with_separators(texts, before=True, after=True)
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        lengths_scored = inputs.row_lengths()
        rows = inputs.nrows()
        windows = (tf.reduce_max(tf.concat([lengths_scored, [1]], 0)) + context - 1) // context
        width = windows * context
        dense_inputs = inputs.to_tensor(pad, shape=tf.stack([rows, width]))
        dense_targets = targets.to_tensor(pad, shape=tf.stack([rows, width]))
        picked = picked_log_probabilities(tf.reshape(dense_inputs, [-1, context]),
                                          tf.reshape(dense_targets, [-1, context]))
        picked = tf.reshape(picked, tf.stack([rows, width]))
        mixed = document_cache.mixed_log_probabilities_graph(
            sequences.to_tensor(pad, shape=tf.stack([rows, width + 1])), picked, cache_weights, vocabulary_size)
        scored = tf.sequence_mask(lengths_scored, width)
        return {"log_probability": tf.reduce_sum(tf.where(scored, mixed, 0.0), axis=1),
                "network_log_probability": tf.reduce_sum(tf.where(scored, picked, 0.0), axis=1),
                "tokens": tf.cast(lengths_scored, tf.int32)}

    score_function = tf.function(score, input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
    return {"generate": tf.function(generate, input_signature=list(GENERATE_SPECS.values())),
            "score": score_function, "serving_default": score_function}


def complete_prompt(model, contract, run_dir: str, prompt: str, generate_tokens, *, max_new_tokens: int,
                    temperature: float, top_k: int, top_p: float, seed: int) -> str:
    """One prompt through the `generate` function of `language_functions`, built on `model` (a
    loaded model.keras): the completion the served signature gives for the same settings."""
    context = int(contract.statistics["context_length"])
    encoder, decoder = language_codec(contract, run_dir)
    length = int(encoder(tf.constant([prompt.encode("utf-8")])).row_lengths()[0]) + 1  # after a document separator
    if length > context - max_new_tokens:  # the model sees only the prompt's end: said, not silent
        log.warning("generate: the prompt is %d tokens with its document separator; the model sees its last %d "
                    "(the context, %d, less max_new_tokens, %d): lower max_new_tokens to keep more of it",
                    length, context - max_new_tokens, context, max_new_tokens)
    function = language_functions(model, contract, encoder, decoder, generate_tokens,
                                  lengths=[generation_length(max_new_tokens, context)])["generate"]
    outputs = function(prompts=tf.constant([prompt.encode("utf-8")]), max_new_tokens=tf.constant(max_new_tokens),
                       temperature=tf.constant(float(temperature)), top_k=tf.constant(top_k),
                       top_p=tf.constant(float(top_p)), seed=tf.constant(seed))
    return outputs["completions"].numpy()[0].decode("utf-8", errors="replace")


FLOAT32_MAX = float(np.finfo(np.float32).max)  # generate's temperature and top_p are float32 in the signature


def checked_generate_arguments(prompt, context: int, *, max_new_tokens, temperature, top_k, top_p, seed) -> dict:
    """`complete_prompt`'s settings as Python numbers, checked as the `generate` signature's dtypes
    (int32, float32) and the model's `context` would take them; a UserError naming the first bad one.
    NumPy's integers and floats are accepted; bools, NaN, infinities and floats past float32 are not."""
    if not isinstance(prompt, str):
        raise UserError(f"prompt: expected a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("prompt: not UTF-8 text (it holds bytes that are not UTF-8)") from None

    def number(value, kind) -> bool:  # NumPy's integers and floats count; bools, NaN and floats past float32 do not
        if not isinstance(value, kind) or isinstance(value, (bool, np.bool_)):
            return False
        return isinstance(value, numbers.Integral) or (math.isfinite(value) and abs(value) <= FLOAT32_MAX)

    int32 = (-2 ** 31, 2 ** 31 - 1)  # the signature's integers are int32, as TF Serving's request would be
    checks = [("max_new_tokens", max_new_tokens,
               number(max_new_tokens, numbers.Integral) and 1 <= max_new_tokens < context, f"an integer from 1 to {context - 1} (the context is {context})"),
              ("temperature", temperature, number(temperature, numbers.Real) and temperature >= 0,
               "0 (greedy) or more, and finite in float32"),
              ("top_k", top_k, number(top_k, numbers.Integral) and 0 <= top_k <= int32[1],
               f"an integer, 0 (off) to {int32[1]}"),
              ("top_p", top_p, number(top_p, numbers.Real) and 0 < top_p <= 1, "above 0 and at most 1"),
              ("seed", seed, number(seed, numbers.Integral) and int32[0] <= seed <= int32[1],
               f"an integer from {int32[0]} to {int32[1]}")]
    for name, value, valid, allowed in checks:
        if not valid:
            raise UserError(f"{name}: {value!r} must be {allowed}")
    return {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_k": int(top_k),
            "top_p": float(top_p), "seed": int(seed)}


SCANNED_BLOCKS = 4096  # blocks of a split that language_texts picks from (1M tokens at a context of 256)


def language_texts(contract, run_dir: str, split: str = "test", count: int = 64, min_tokens: int = 8) -> list[str]:
    """Up to `count` texts of a split, as a client would send them: pieces of the blocks between
    separators (documents or their parts) of at least `min_tokens` ids, decoded, spread evenly over
    the split's first SCANNED_BLOCKS blocks. (The first `count` pieces in file order were often one
    long document's, which spans a piece a block: validation then scored that document alone.)"""
    tokenizer = contract_lib.language_tokenizer(contract)
    vocabulary = contract_lib.language_vocabulary(run_dir, contract)
    pieces, blocks_read = [], 0
    for blocks, _, _ in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split, 64):
        for block in blocks.numpy():
            piece = []
            for token in [*block.tolist(), contract_lib.LANGUAGE_SEPARATOR]:
                if token not in (contract_lib.LANGUAGE_SEPARATOR, contract_lib.LANGUAGE_PAD):
                    piece.append(token)
                    continue
                if len(piece) >= min_tokens:
                    pieces.append(piece)
                piece = []
        blocks_read += len(blocks)
        if blocks_read >= SCANNED_BLOCKS:
            break
    if len(pieces) > count:  # evenly spaced, first and last included
        pieces = [pieces[round(index * (len(pieces) - 1) / max(1, count - 1))] for index in range(count)]
    return [contract_lib.decode_language(piece, tokenizer, vocabulary) for piece in pieces]


def language_codec(contract, run_dir: str) -> tuple:
    """The in-graph (encoder, decoder) of a language run: strings -> ragged ids, ids -> strings."""
    return example_lib.language_encoder(contract, run_dir), example_lib.language_decoder(contract, run_dir)
