"""Text generation with a gpt model: sampling loop, key/value cache, attention maps.

    new_ids = generate_tokens(model, prompt, 64, temperature=0.8, top_k=40, seed=1)

`generate_tokens` is written with `keras.ops` and static shapes, so one function runs eagerly
(TensorFlow, JAX), inside `tf.function` with tensor arguments (the SavedModel's `generate`
signature, `tf.map_fn` over a batch of prompts) and under XLA:

- a token buffer of the model's context length C holds the prompt, then the new ids;
- with the cache (`use_cache=True`, the default), every step feeds ONE token through the
  blocks' `decode_step` against fixed-size (1, C, heads, head_dim) key/value caches, one per
  block. The prompt goes through the same step one token at a time (prefill), so every loop
  step has the same shapes and the loop is one `while_loop` with a dynamic trip count;
- without it, every step runs the whole model on the (1, C) buffer and reads the logits at
  the current position (causal attention: the zeros after it change nothing). Same tokens,
  C / 1 times the work: the reference for the cache and the benchmark's baseline.

When the prompt and the new tokens do not fit the context, only the LAST
`C - wanted` prompt ids are kept (`wanted`: the new ids the caller keeps, max_new_tokens by
default) (the window slides once, before generation, never
during it), so `max_new_tokens` must be below C.

Sampling: temperature 0 is greedy (argmax); otherwise the logits are divided by the
temperature, the top-k filter keeps the k largest (0: off), the nucleus filter keeps the
smallest set of most likely ids whose probability reaches top_p (1.0: off), and one id is
drawn by inverting the cumulative distribution at a uniform number u. u comes from a
stateless generator keyed by (seed, index of the new token): `tf.random.stateless_uniform`
under TensorFlow, `jax.random.fold_in` under JAX, a seeded `torch.Generator` under torch
(`keras.random` takes only Python-int seeds or stateful SeedGenerators, neither of which is
a tensor argument nor the same at every call). So the same seed gives the same tokens
eagerly, inside `tf.function` and in the exported SavedModel, and the cached and uncached
paths draw the same u for the same new token. Different backends draw different numbers.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

from trainer.models.gpt import context_length, layer_classes, model_parts

layer_classes()  # registers the gpt layers, so `keras.saving.load_model` can read a gpt model.keras


def generate_tokens(model, prompt, max_new_tokens: int, *, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                    use_cache: bool = True, wanted=None):
    """Samples `max_new_tokens` ids after `prompt` from a gpt model.

    Args:
        model: a model built by trainer.models.gpt (or reloaded from its model.keras).
        prompt: int32 1-D tensor of at least one id; its length may be dynamic. Only its last
            `context - wanted` ids are used when it is longer.
        max_new_tokens: a Python int, 1 .. context - 1: the output's static length.
        temperature: 0 greedy; > 0 sample from softmax(logits / temperature). Float or scalar tensor.
        top_k: keep the k most likely ids (0: all). Int or scalar tensor.
        top_p: keep the most likely ids whose probabilities add up to top_p (1.0: all). Float or tensor.
        seed: int or scalar int tensor; same seed, same tokens (on one backend).
        use_cache: the one-token cached step (True) or a full forward per token (False).
        wanted: the new ids the caller will keep, 1 .. max_new_tokens (default max_new_tokens; int or
            scalar tensor): the prompt keeps its last `context - wanted` ids, so a caller that runs a
            longer static length than it wants (the export's generate signature) loses no more of the
            prompt than the request needs. Ids past `wanted` may then repeat the last one; drop them.
    Returns:
        int32 1-D tensor of exactly `max_new_tokens` new ids.
    """
    context = context_length(model)
    if not isinstance(max_new_tokens, numbers.Integral) or not 1 <= max_new_tokens < context:
        raise ValueError(f"max_new_tokens: {max_new_tokens!r} must be an int from 1 to {context - 1} "
                         f"(the model's context is {context})")
    prompt = ops.cast(ops.reshape(prompt, (-1,)), "int32")
    if prompt.shape[0] == 0:
        raise ValueError("prompt: at least one token id is needed")
    if wanted is None:
        wanted = max_new_tokens
    elif isinstance(wanted, numbers.Integral) and not 1 <= wanted <= max_new_tokens:
        raise ValueError(f"wanted: {wanted!r} must be an int from 1 to max_new_tokens ({max_new_tokens})")
    prompt_length = ops.shape(prompt)[0]
    kept = ops.minimum(prompt_length, context - wanted)  # the prompt ids kept, the last ones
    positions = ops.arange(context, dtype="int32")
    from_prompt = ops.take(prompt, ops.clip(positions + (prompt_length - kept), 0, prompt_length - 1))
    buffer = ops.where(positions < kept, from_prompt, ops.zeros_like(from_prompt))  # (context,) prompt, then zeros
    last = ops.minimum(kept + max_new_tokens - 1, context - 1)  # the buffer's last position that gets written

    def sample(logits, position):
        """The id after `position`: the prompt's own while inside it, a new one after."""
        step = ops.maximum(position - (kept - 1), 0)  # the new token's index; prefill steps' draws are unused
        new = sample_token(logits, step, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed)
        return ops.where(position + 1 < kept, ops.take(buffer, ops.minimum(position + 1, context - 1)), new)

    if use_cache:
        parts = model_parts(model)
        caches = empty_caches(parts, context)

        def cached_body(position, buffer, keys, values):
            logits, keys, values = cached_step(parts, ops.take(buffer, position), position, keys, values)
            buffer = ops.slice_update(buffer, (position + 1,), ops.reshape(sample(logits, position), (1,)))
            return position + 1, buffer, keys, values

        _, buffer, _, _ = ops.while_loop(lambda position, *_: position < last, cached_body,
                                         (ops.convert_to_tensor(0, "int32"), buffer, *caches),
                                         maximum_iterations=context - 1)
    else:
        def full_body(position, buffer):
            logits = model(buffer[None], training=False)[0]  # (context, vocab_size)
            logits = ops.take(logits, position, axis=0)
            buffer = ops.slice_update(buffer, (position + 1,), ops.reshape(sample(logits, position), (1,)))
            return position + 1, buffer

        _, buffer = ops.while_loop(lambda position, _: position < last, full_body, (kept - 1, buffer),
                                   maximum_iterations=max_new_tokens)
    return ops.take(buffer, ops.minimum(kept + ops.arange(max_new_tokens, dtype="int32"), context - 1))


def empty_caches(parts: dict, context: int) -> tuple:
    """(keys, values): per block, zeros (1, context, heads, head_dim) in the model's compute dtype."""
    dtype = parts["blocks"][0].compute_dtype
    shapes = [(1, context, block.heads, block.head_dim) for block in parts["blocks"]]
    return (tuple(ops.zeros(shape, dtype) for shape in shapes), tuple(ops.zeros(shape, dtype) for shape in shapes))


def cached_step(parts: dict, token, position, keys: tuple, values: tuple):
    """One token through the model at `position` with the key/value caches.

    Returns (float32 logits (vocab_size,), keys, values) with this position's entries written.
    """
    x = parts["embedding"](ops.reshape(token, (1, 1)))  # (1, 1, dim)
    x = parts["position"](x, start=position)
    new_keys, new_values = [], []
    for block, block_keys, block_values in zip(parts["blocks"], keys, values):
        x, block_keys, block_values = block.decode_step(x, block_keys, block_values, position)
        new_keys.append(block_keys)
        new_values.append(block_values)
    logits = parts["embedding"](parts["final_norm"](x), reverse=True)  # (1, 1, vocab_size)
    return ops.cast(ops.reshape(logits, (-1,)), "float32"), tuple(new_keys), tuple(new_values)


def sample_token(logits, step, *, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """One id from float32 logits (vocab_size,); `step` (the new token's index) keys the randomness.

    Python numbers that switch a filter off skip its work (no sort of the vocabulary); tensors
    are applied in the graph, so a serving signature can take them as inputs.
    """
    logits = ops.cast(logits, "float32")
    greedy = ops.cast(ops.argmax(logits), "int32")
    if isinstance(temperature, numbers.Number) and temperature == 0:
        return greedy
    vocab_size = logits.shape[-1]
    scaled = logits / ops.maximum(ops.cast(temperature, "float32"), 1e-6)
    top_k_off = isinstance(top_k, numbers.Integral) and top_k == 0
    top_p_off = isinstance(top_p, numbers.Number) and top_p >= 1.0
    if not (top_k_off and top_p_off):
        ranked = ops.flip(ops.sort(scaled))  # descending
        rank = ops.arange(vocab_size, dtype="int32")
        if not top_k_off:  # k <= 0 keeps every rank
            k = ops.cast(top_k, "int32")
            ranked = ops.where((k <= 0) | (rank < k), ranked, float("-inf"))
        if not top_p_off:  # keep a rank while the mass before it is below top_p (the first always)
            probabilities = ops.softmax(ranked)
            mass_before = ops.cumsum(probabilities) - probabilities
            ranked = ops.where(mass_before < ops.cast(top_p, "float32"), ranked, float("-inf"))
        floor = ops.min(ops.where(ranked > float("-inf"), ranked, float("inf")))  # smallest logit kept
        scaled = ops.where(scaled >= floor, scaled, float("-inf"))
    cumulative = ops.cumsum(ops.softmax(scaled))
    target = stateless_uniform(seed, step) * cumulative[-1]
    sampled = ops.minimum(ops.cast(ops.sum(ops.cast(cumulative < target, "int32")), "int32"), vocab_size - 1)
    if isinstance(temperature, numbers.Number):
        return sampled
    return ops.where(ops.cast(temperature, "float32") > 0, sampled, greedy)


def stateless_uniform(seed, step):
    """A float32 scalar in [0, 1), a pure function of (seed, step), on the current backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        key = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
        return tf.random.stateless_uniform((), seed=key, dtype=tf.float32)
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        return jax.random.uniform(key, (), dtype="float32")
    if backend == "torch":
        import torch

        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
        return ops.convert_to_tensor(torch.rand((), generator=generator).item(), "float32")
    raise NotImplementedError(f"generation's sampling has no stateless generator for the {backend!r} backend")


def generate(model, prompt_ids: list, max_new_tokens: int, **options) -> list:
    """`generate_tokens` on a list of ids: the new ids as a list of ints.

    Under TensorFlow the loop runs as one `tf.function` graph (not XLA, as the exported
    signature runs): eager op-by-op execution pays Keras' per-call overhead on every small op
    of every step, about 10x slower at the default size (bench/gpt_generate.py).
    """
    prompt = ops.convert_to_tensor(list(prompt_ids), "int32")

    def run(prompt):
        return generate_tokens(model, prompt, max_new_tokens, **options)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        run = tf.function(run, input_signature=[tf.TensorSpec((None,), tf.int32)])
    return [int(token) for token in ops.convert_to_numpy(run(prompt))]


def attention_scores(model, tokens) -> list:
    """Every block's causal attention probabilities for int32 tokens (batch, time):
    a list of NumPy arrays (batch, heads, time, time), explicit softmax (rows sum to 1, zeros
    above the diagonal), for the report's attention maps."""
    parts = model_parts(model)
    x = parts["position"](parts["embedding"](ops.convert_to_tensor(tokens, "int32")))
    scores = []
    for block in parts["blocks"]:
        scores.append(ops.convert_to_numpy(block.attention_probabilities(x)))
        x = block(x, training=False)
    return scores
