"""The gpt family and its generation loop (trainer/models/gpt.py, trainer/generate.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

import keras
from kcp.core.config import ConfigError
from kcp.core.config_load import load_config
from trainer.generate import attention_scores, cached_step, empty_caches, generate, generate_tokens, sample_token
from trainer.models import ModelInputs, build_model
from trainer.models.gpt import model_parts, parameter_count

VOCAB = 40
CONTEXT = 16
TINY = ["model.layers=2", "model.heads=2", "model.dim=32", "model.dropout=0.0"]


def gpt_config(*extra):
    return load_config([], ["model.name=gpt", *extra]).model


def language_spec(context=CONTEXT, vocab_size=VOCAB):
    return ModelInputs("language", (context,), vocab_size, vocab_size=vocab_size, input_name="tokens")


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(7)
    return build_model(language_spec(), gpt_config(*TINY))


def random_tokens(count, length, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(count, length)).astype(np.int32)


def test_gpt2_small_has_124_439_808_parameters():
    model = build_model(language_spec(1024, 50_257), gpt_config("model.size=gpt2-small"))
    assert model.count_params() == 124_439_808
    assert parameter_count(vocab_size=50_257, context=1024, layers=12, dim=768) == 124_439_808


def test_output_logits_are_the_token_embedding_transposed(tiny_model):
    # tied: the count has one vocabulary matrix, and the logits are final_norm(x) @ embeddings.T (no bias)
    assert tiny_model.count_params() == parameter_count(vocab_size=VOCAB, context=CONTEXT, layers=2, dim=32)
    assert sum(VOCAB in weight.shape for weight in tiny_model.weights) == 1
    tokens = random_tokens(2, CONTEXT)
    normed = keras.Model(tiny_model.input, tiny_model.get_layer("final_norm").output)(tokens)
    embeddings = tiny_model.get_layer("token_embedding").embeddings
    logits = tiny_model(tokens)
    assert logits.shape == (2, CONTEXT, VOCAB) and logits.dtype == tf.float32
    np.testing.assert_allclose(logits, np.asarray(normed) @ np.asarray(embeddings).T, atol=1e-5)


def test_changing_a_token_changes_no_earlier_logit(tiny_model):
    tokens = random_tokens(1, CONTEXT)
    changed = tokens.copy()
    changed[0, 9] = 3 + (tokens[0, 9] - 3 + 1) % (VOCAB - 3)
    before, after = np.asarray(tiny_model(tokens)), np.asarray(tiny_model(changed))
    np.testing.assert_allclose(before[:, :9], after[:, :9], atol=1e-6)
    assert np.abs(before[:, 9:] - after[:, 9:]).max(axis=-1).min() > 1e-4  # every later position moves


def test_a_shorter_sequence_gives_the_same_logits_as_its_prefix(tiny_model):
    tokens = random_tokens(2, CONTEXT)
    np.testing.assert_allclose(tiny_model(tokens[:, :5]), np.asarray(tiny_model(tokens))[:, :5], atol=1e-5)


def test_cached_step_logits_equal_the_full_forward(tiny_model):
    tokens = random_tokens(1, CONTEXT, seed=3)
    full = np.asarray(tiny_model(tokens))[0]  # (time, vocab)
    parts = model_parts(tiny_model)
    keys, values = empty_caches(parts, CONTEXT)
    for position in range(CONTEXT):
        logits, keys, values = cached_step(parts, tf.constant(tokens[0, position]), tf.constant(position),
                                           keys, values)
        np.testing.assert_allclose(logits, full[position], atol=1e-4, err_msg=f"position {position}")


@pytest.mark.parametrize("options", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 5},
                                     {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 2}])
def test_cached_and_uncached_generation_give_the_same_tokens(tiny_model, options):
    prompt = tf.constant([5, 9, 4], tf.int32)
    cached = generate_tokens(tiny_model, prompt, 6, use_cache=True, **options)
    uncached = generate_tokens(tiny_model, prompt, 6, use_cache=False, **options)
    assert cached.shape == (6,) and cached.dtype == tf.int32
    np.testing.assert_array_equal(cached, uncached)


def test_greedy_generation_follows_the_argmax_of_the_full_model(tiny_model):
    prompt = [5, 9, 4]
    new = generate(tiny_model, prompt, 6, temperature=0.0)
    sequence = list(prompt)
    for _ in range(6):
        sequence.append(int(np.argmax(np.asarray(tiny_model(np.array([sequence], np.int32)))[0, -1])))
    assert new == sequence[3:]


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_model):
    prompt = tf.constant([5, 9], tf.int32)
    first = generate_tokens(tiny_model, prompt, 8, temperature=1.0, seed=11)
    again = generate_tokens(tiny_model, prompt, 8, temperature=1.0, seed=11)
    other = generate_tokens(tiny_model, prompt, 8, temperature=1.0, seed=12)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # near uniform over 37 ids: 8 equal draws are out of reach


def test_generation_inside_tf_function_equals_eager_with_tensor_options(tiny_model):
    @tf.function
    def exported(prompts, temperature, top_k, top_p, seed):
        return tf.map_fn(lambda prompt: generate_tokens(tiny_model, prompt, 4, temperature=temperature, top_k=top_k,
                                                        top_p=top_p, seed=seed),
                         prompts, fn_output_signature=tf.TensorSpec((4,), tf.int32))

    prompts = random_tokens(2, 3, seed=5)
    for options in ({"temperature": 0.9, "top_k": 6, "top_p": 0.8, "seed": 3},
                    {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}):
        in_graph = exported(tf.constant(prompts), *(tf.constant(value) for value in options.values()))
        eager = [generate_tokens(tiny_model, tf.constant(prompt), 4, **options) for prompt in prompts]
        np.testing.assert_array_equal(in_graph, np.stack(eager))


def test_top_k_1_and_a_tiny_top_p_are_greedy(tiny_model):
    prompt = tf.constant([7, 3, 8], tf.int32)
    greedy = generate_tokens(tiny_model, prompt, 8, temperature=0.0)
    np.testing.assert_array_equal(generate_tokens(tiny_model, prompt, 8, temperature=1.5, top_k=1, seed=4), greedy)
    np.testing.assert_array_equal(generate_tokens(tiny_model, prompt, 8, temperature=1.5, top_p=1e-3, seed=4), greedy)


def test_sampling_follows_the_filtered_distribution():
    logits = tf.math.log(tf.constant([0.05, 0.5, 0.3, 0.15]))

    def draws(**options):  # the share of each id in 400 draws, steps 0..399
        sampled = tf.function(lambda: tf.map_fn(lambda step: sample_token(logits, step, seed=1, **options),
                                                tf.range(400), fn_output_signature=tf.int32))()
        return np.bincount(sampled.numpy(), minlength=4) / 400

    np.testing.assert_allclose(draws(), [0.05, 0.5, 0.3, 0.15], atol=0.06)
    np.testing.assert_allclose(draws(top_k=2), [0, 0.5 / 0.8, 0.3 / 0.8, 0], atol=0.06)
    np.testing.assert_allclose(draws(top_p=0.7), [0, 0.5 / 0.8, 0.3 / 0.8, 0], atol=0.06)  # 0.5 < 0.7 <= 0.8
    assert draws(temperature=0.0)[1] == 1.0


def test_a_long_prompt_keeps_its_last_ids(tiny_model):
    prompt = random_tokens(1, 30, seed=9)[0]
    new = generate_tokens(tiny_model, tf.constant(prompt), 4, temperature=0.0)
    np.testing.assert_array_equal(new, generate_tokens(tiny_model, tf.constant(prompt[-(CONTEXT - 4):]), 4,
                                                       temperature=0.0))
    with pytest.raises(ValueError, match="max_new_tokens: 16 must be an int from 1 to 15"):
        generate_tokens(tiny_model, tf.constant(prompt), CONTEXT)


def test_a_longer_static_length_keeps_the_prompt_the_request_leaves_room_for(tiny_model):
    # the export runs 1, 2, 4, ... context - 1 new ids and keeps the first `wanted`: the prompt must keep
    # its last context - wanted ids, not context - (the longer length) (which was one id here)
    prompt = random_tokens(1, 10, seed=3)[0]
    expected = generate_tokens(tiny_model, tf.constant(prompt), 5, temperature=0.0)
    longer = generate_tokens(tiny_model, tf.constant(prompt), CONTEXT - 1, temperature=0.0, wanted=5)
    np.testing.assert_array_equal(longer[:5], expected)
    in_graph = tf.function(lambda wanted: generate_tokens(tiny_model, tf.constant(prompt), CONTEXT - 1,
                                                          temperature=0.0, wanted=wanted))
    np.testing.assert_array_equal(in_graph(tf.constant(5))[:5], expected)
    with pytest.raises(ValueError, match="wanted: 9 must be an int from 1 to max_new_tokens"):
        generate_tokens(tiny_model, tf.constant(prompt), 8, wanted=9)


def test_save_and_reload_give_identical_logits_and_tokens(tiny_model, tmp_path):
    path = str(tmp_path / "model.keras")
    tiny_model.save(path)
    reloaded = keras.saving.load_model(path)
    tokens = random_tokens(2, CONTEXT)
    np.testing.assert_array_equal(tiny_model(tokens), reloaded(tokens))
    assert generate(reloaded, [4, 5], 8, temperature=1.0, seed=3) == generate(tiny_model, [4, 5], 8, temperature=1.0,
                                                                              seed=3)


def test_attention_scores_are_causal_probabilities(tiny_model):
    scores = attention_scores(tiny_model, random_tokens(2, 6))
    assert len(scores) == 2 and scores[0].shape == (2, 2, 6, 6)
    for block in scores:
        np.testing.assert_allclose(block.sum(axis=-1), 1.0, atol=1e-5)
        assert np.all(block[..., np.triu_indices(6, k=1)[0], np.triu_indices(6, k=1)[1]] == 0)
        np.testing.assert_allclose(block[..., 0, 0], 1.0)  # the first token sees only itself


def test_a_tiny_model_overfits_a_repeated_byte_string():
    text = b"def add(a, b):\n    return a + b\n" * 6
    ids = np.frombuffer(text, np.uint8).astype(np.int32) + 3  # ids 0-2 are reserved
    windows = np.stack([ids[start:start + CONTEXT + 1] for start in range(0, len(ids) - CONTEXT - 1, 3)])
    keras.utils.set_random_seed(1)
    model = build_model(language_spec(vocab_size=259), gpt_config(*TINY))
    model.compile(keras.optimizers.Adam(5e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                                          ignore_class=0))
    history = model.fit(windows[:, :-1], windows[:, 1:], batch_size=len(windows), epochs=80, verbose=0)
    losses = history.history["loss"]
    assert losses[0] > 5.0 and losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    assert generate(model, list(ids[:8]), 7, temperature=0.0) == list(ids[8:15])  # it continues the text


def test_language_inputs_come_from_the_contract():
    contract = SimpleNamespace(modality="language", statistics={"vocab_size": 259, "context_length": 256},
                               num_classes=0, input_shape=(), input_feature="text")
    spec = ModelInputs.from_contract(contract)
    assert (spec.modality, spec.shape, spec.vocab_size, spec.num_classes, spec.input_name, spec.dtype) == (
        "language", (256,), 259, 259, "tokens", "int32")
    with pytest.raises(ConfigError, match="vocab_size 3 is too small for language input"):
        ModelInputs("language", (8,), 3, vocab_size=3)
    with pytest.raises(ConfigError, match="model.name: gpt takes language data, and this run's data is text"):
        build_model(ModelInputs("text", (8,), 3, vocab_size=20), gpt_config(*TINY))


def test_size_presets_set_the_shape_and_refuse_conflicts():
    small = gpt_config("model.size=gpt2-small")
    assert (small.layers, small.heads, small.dim, small.mlp_ratio) == (12, 12, 768, 4)
    assert gpt_config().layers == 4 and gpt_config().dim == 256
    with pytest.raises(ConfigError, match="model.layers: 6 conflicts with model.size: gpt2-small"):
        gpt_config("model.size=gpt2-small", "model.layers=6")
    with pytest.raises(ConfigError, match="model.dim: 30 is not divisible by model.heads"):
        gpt_config("model.dim=30")
