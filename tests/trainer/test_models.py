"""One table of tests over every family and every modality it supports (STYLE: keras applications)."""

import numpy as np
import pytest
import tensorflow as tf

import keras
from kcp.core.config import ConfigError
from kcp.core.families import MODEL_FAMILIES
from kcp.core.config_load import load_config
from trainer.models import REGISTRY, ModelInputs, build_model, families_for
from trainer.models.common import batch_norm_momentum_for
from trainer.models.transformer import attention_layers, attention_scores

SPECS = {
    "image": ModelInputs("image", (8, 8, 1), 10, mean=(100.0,), std=(50.0,), input_name="image"),
    "sequence": ModelInputs("sequence", (12, 3), 4, mean=(0.0, 1.0, 2.0), std=(1.0, 2.0, 3.0), input_name="sequence"),
    "text": ModelInputs("text", (10,), 3, vocab_size=50, input_name="text"),
}
SMALL = {  # small settings of each family, so the whole table runs in a couple of minutes
    "cnn": ["model.filters=[16, 32]"],
    "resnet": ["model.depth=8", "model.width=8", "model.embedding_dropout=0.0"],
    "rnn": ["model.units=32"],
    "transformer": ["model.dim=32", "model.heads=2", "model.mlp_dim=64", "model.patch_size=2"],
}
CASES = [(family, modality) for modality in SPECS for family in families_for(modality)]  # gpt: test_gpt.py


def small_config(family, *extra):
    return load_config([], [f"model.name={family}", "model.dropout=0.0", *SMALL[family], *extra]).model


def random_inputs(spec, count, seed=0):
    rng = np.random.default_rng(seed)
    if spec.modality == "text":
        tokens = rng.integers(2, spec.vocab_size, size=(count, *spec.shape))
        lengths = rng.integers(3, spec.shape[0] + 1, size=count)
        tokens[np.arange(spec.shape[0])[None, :] >= lengths[:, None]] = 0  # padded tails
        return tokens.astype(np.int32)
    return rng.normal(100.0, 50.0, size=(count, *spec.shape)).astype(np.float32)


def test_registry_names_match_the_config():
    assert tuple(REGISTRY) == tuple(MODEL_FAMILIES)


def test_a_family_refuses_data_it_does_not_take_and_names_the_ones_that_do():
    language = ModelInputs("language", (16,), 259, vocab_size=259, input_name="tokens")
    with pytest.raises(ConfigError, match="model.name: cnn takes image, sequence, text data, and this run's data "
                                          "is language; for language data use gpt"):
        build_model(language, small_config("cnn"))
    with pytest.raises(ConfigError, match="model.name: gpt takes language data, and this run's data is image; "
                                          "for image data use cnn or resnet or rnn or transformer"):
        build_model(SPECS["image"], load_config([], ["model.name=gpt"]).model)


@pytest.mark.parametrize("family, modality", CASES)
def test_output_is_a_probability_per_class(family, modality):
    spec = SPECS[modality]
    model = build_model(spec, small_config(family))
    probabilities = model.predict(random_inputs(spec, 5), verbose=0)
    assert probabilities.shape == (5, spec.num_classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family, modality", CASES)
def test_save_and_reload_give_identical_predictions(family, modality, tmp_path):
    spec = SPECS[modality]
    model = build_model(spec, small_config(family))
    inputs = random_inputs(spec, 4)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict(inputs, verbose=0), reloaded.predict(inputs, verbose=0))


def test_register_custom_layers_is_all_a_fresh_process_needs_to_load_any_model(tmp_path):
    """model.keras of a text rnn (WordDropout, BidirectionalRNN) and of gpt (its blocks), loaded in a
    process that imports nothing of kcp's but trainer.models."""
    import subprocess
    import sys

    spec = SPECS["text"]
    build_model(spec, small_config("rnn", "model.word_dropout=0.1")).save(str(tmp_path / "rnn.keras"))
    gpt = load_config([], ["model.name=gpt", "model.size=custom", "model.layers=1", "model.dim=16",
                           "model.heads=2"]).model
    from trainer.objectives import loss_and_metrics

    language = build_model(ModelInputs("language", (8,), 300, vocab_size=300, input_name="tokens"), gpt)
    loss, metrics = loss_and_metrics(load_config().train, 300, "language")
    language.compile(optimizer="adam", loss=loss, metrics=metrics)  # compiled, as the trainer saves it
    language.save(str(tmp_path / "gpt.keras"))
    script = ("import keras, trainer.models; trainer.models.register_custom_layers(); "
              f"print([len(keras.saving.load_model(p).layers) > 0 for p in ({str(tmp_path / 'rnn.keras')!r}, "
              f"{str(tmp_path / 'gpt.keras')!r})])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[True, True]"
    # a notebook's fresh kernel: the API's TrainResult.load_model, with nothing imported by hand
    script = ("import kcp; models = [kcp.TrainResult({}, {}, p).load_model() for p in "
              f"({str(tmp_path / 'rnn.keras')!r}, {str(tmp_path / 'gpt.keras')!r})]; "
              "print([type(layer).__name__ for model in models for layer in model.layers])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = result.stdout.strip().splitlines()[-1]
    assert "WordDropout" in names and "BidirectionalRNN" in names and "DecoderBlock" in names, names


@pytest.mark.parametrize("family, modality", CASES)
def test_gradients_reach_the_first_layer(family, modality):
    spec = SPECS[modality]
    model = build_model(spec, small_config(family))
    first = next(layer for layer in model.layers if layer.trainable_weights)
    inputs = random_inputs(spec, 8)
    labels = np.arange(8) % spec.num_classes
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(labels, model(inputs, training=True))
    gradients = tape.gradient(loss, first.trainable_weights)
    assert any(float(tf.norm(g)) > 0 for g in gradients if g is not None), first.name


class StopAtPerfectAccuracy(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if logs["accuracy"] >= 1.0:
            self.model.stop_training = True


@pytest.mark.parametrize("family, modality", CASES)
def test_overfits_a_fixed_batch_of_64(family, modality):
    spec = SPECS[modality]
    keras.utils.set_random_seed(1)
    model = build_model(spec, small_config(family))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    inputs = random_inputs(spec, 64, seed=2)
    labels = np.random.default_rng(3).integers(0, spec.num_classes, 64)
    history = model.fit(inputs, labels, batch_size=64, epochs=400, verbose=0, shuffle=False,
                        callbacks=[StopAtPerfectAccuracy()])
    assert history.history["accuracy"][-1] == 1.0, f"{len(history.history['accuracy'])} steps"


@pytest.mark.parametrize("depth, expected", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_parameter_counts_match_he_et_al(depth, expected):
    config = load_config([], ["model.name=resnet", f"model.depth={depth}", "model.width=16"]).model  # the paper's
    model = build_model(ModelInputs("image", (32, 32, 3), 10), config)
    assert abs(model.count_params() - expected) / expected <= 0.03


def test_resnet50_v1_matches_keras_applications_exactly():
    config = load_config([], ["model.name=resnet", "model.depth=50"]).model
    model = build_model(ModelInputs("image", (224, 224, 3), 1000), config)
    assert model.count_params() == 25_636_712


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("depth", [18, 34, 101])
def test_imagenet_resnets_build_for_both_versions(depth, version):
    config = load_config([], ["model.name=resnet", f"model.depth={depth}", f"model.version={version}"]).model
    model = build_model(ModelInputs("image", (64, 64, 3), 5), config)
    assert model.output_shape == (None, 5)
    assert model.name == f"resnet{depth}_v{version}"


def test_resnet_v2_is_pre_activation():
    config = load_config([], ["model.name=resnet", "model.depth=20", "model.version=2"]).model
    model = build_model(ModelInputs("image", (32, 32, 3), 10), config)
    names = [layer.name for layer in model.layers]
    assert "conv2_block1_preact_bn" in names and "post_bn" in names and "conv1_bn" not in names


def test_resnet_on_text_is_as_wide_as_the_embedding_unless_told():
    config = load_config([], ["model.name=resnet", "model.depth=8", "model.dim=24"]).model
    assert build_model(SPECS["text"], config).get_layer("conv1_conv").filters == 24  # no 24 -> 16 squeeze
    assert build_model(SPECS["image"], config).get_layer("conv1_conv").filters == 16
    assert config.family.applied(SPECS["text"]) == {"depth": 8, "width": 24, "kernel_size": 3, "dropout": 0.1}
    assert config.family.applied(SPECS["image"]) == {"depth": 8, "width": 16, "kernel_size": 3, "dropout": 0.1}
    told = load_config([], ["model.name=resnet", "model.depth=8", "model.width=8"]).model
    assert build_model(SPECS["text"], told).get_layer("conv1_conv").filters == 8
    # images larger than 16x16 start twice as wide (wide ResNets); up to 16x16 and sequences at 16
    for shape, width in (((32, 32, 3), 32), ((17, 40, 1), 32), ((16, 16, 3), 16), ((40, 16, 3), 16)):
        spec = ModelInputs("image", shape, 10)
        assert config.family.applied(spec)["width"] == width, shape
    assert build_model(ModelInputs("image", (32, 32, 3), 10), config).get_layer("conv1_conv").filters == 32
    assert config.family.applied(SPECS["sequence"]) == {"depth": 8, "width": 16, "kernel_size": 5, "dropout": 0.3}
    assert build_model(ModelInputs("image", (32, 32, 3), 10), told).get_layer("conv1_conv").filters == 8


def test_resnet_drops_30_percent_of_the_text_embedding_by_default():
    config = load_config([], ["model.name=resnet", "model.depth=8", "model.width=8"]).model
    assert build_model(SPECS["text"], config).get_layer("embedding_dropout").rate == 0.3
    off = load_config([], ["model.name=resnet", "model.depth=8", "model.width=8", "model.embedding_dropout=0"]).model
    assert "embedding_dropout" not in [layer.name for layer in build_model(SPECS["text"], off).layers]


def test_word_dropout_turns_real_tokens_into_the_unknown_id_in_training_only():
    from trainer.models.layers import WordDropout

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(200, 100)).astype(np.int32)  # 0 padding, 1 unknown, 2.. real
    layer = WordDropout(0.3, seed=1)
    dropped = np.asarray(layer(ids, training=True))
    real = ids > 1
    assert np.array_equal(dropped[~real], ids[~real])  # padding and unknown ids stay
    changed = dropped != ids
    assert np.all(dropped[changed] == 1)  # a dropped token becomes the unknown id, nothing else
    assert 0.28 < changed[real].mean() < 0.32  # of about 19,000 real tokens
    assert not np.array_equal(np.asarray(layer(ids, training=True)), dropped)  # new draws each step
    assert np.array_equal(np.asarray(layer(ids, training=False)), ids)
    assert np.array_equal(np.asarray(layer(ids)), ids)
    with pytest.raises(ValueError, match="model.word_dropout: 1.0"):
        WordDropout(1.0)


@pytest.mark.parametrize("family", families_for("text"))
def test_every_text_classifier_drops_a_tenth_of_its_words_by_default(family, tmp_path):
    model = build_model(SPECS["text"], small_config(family))
    assert model.get_layer("word_dropout").rate == 0.1
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert keras.saving.load_model(path).get_layer("word_dropout").rate == 0.1
    off = build_model(SPECS["text"], small_config(family, "model.word_dropout=0"))
    assert "word_dropout" not in [layer.name for layer in off.layers]
    if family in families_for("image"):
        assert "word_dropout" not in [layer.name for layer in build_model(SPECS["image"], small_config(family)).layers]


@pytest.mark.parametrize("depth", [21, 9, 100])
def test_invalid_resnet_depths_are_rejected(depth):
    with pytest.raises(ConfigError, match=f"model.depth: {depth} is not a ResNet depth"):
        load_config([], ["model.name=resnet", f"model.depth={depth}"])


@pytest.mark.parametrize("cell, layer_class", [("simple", "SimpleRNN"), ("lstm", "LSTM"), ("gru", "GRU")])
def test_rnn_cells_stacking_and_bidirectional(cell, layer_class):
    config = small_config("rnn", f"model.cell={cell}", "model.layers=3", "model.bidirectional=true")
    model = build_model(SPECS["sequence"], config)
    wrappers = [layer for layer in model.layers if layer.name.endswith("_bidirectional")]
    assert [w.name for w in wrappers] == ["rnn1_bidirectional", "rnn2_bidirectional", "rnn3_bidirectional"]
    assert all(type(w.forward_layer).__name__ == layer_class for w in wrappers)


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("cell, keras_layer", [("simple", "SimpleRNN"), ("lstm", "LSTM"), ("gru", "GRU")])
def test_bidirectional_rnn_equals_keras_bidirectional_with_the_same_weights(cell, keras_layer, return_sequences):
    from trainer.models.layers import BidirectionalRNN

    rng = np.random.default_rng(5)
    steps = rng.normal(size=(3, 7, 4)).astype(np.float32)
    mask = np.arange(7)[None, :] < np.array([[7], [4], [2]])  # right-padded rows of 7, 4 and 2 real steps
    ours = BidirectionalRNN(cell, 5, return_sequences=return_sequences)
    reference = keras.layers.Bidirectional(getattr(keras.layers, keras_layer)(5, return_sequences=return_sequences))
    expected_shape = ours(steps, mask=mask).shape
    reference(steps, mask=mask)
    reference.set_weights(ours.get_weights())  # same order: forward kernels, then backward
    np.testing.assert_allclose(ours(steps, mask=mask), reference(steps, mask=mask), atol=1e-6)
    np.testing.assert_allclose(ours(steps), reference(steps), atol=1e-6)
    assert expected_shape == ((3, 7, 10) if return_sequences else (3, 10))


@pytest.mark.parametrize("return_sequences", [False, True])
def test_bidirectional_rnn_reads_padded_rows_as_their_real_steps(return_sequences):
    from trainer.models.layers import BidirectionalRNN

    layer = BidirectionalRNN("gru", 6, return_sequences=return_sequences)
    steps = np.random.default_rng(6).normal(size=(2, 4, 3)).astype(np.float32)
    padded = np.concatenate([steps, np.full((2, 5, 3), 9.0, np.float32)], axis=1)  # 5 steps of junk after
    mask = np.arange(9)[None, :] < 4
    unpadded, masked = np.asarray(layer(steps)), np.asarray(layer(padded, mask=np.repeat(mask, 2, axis=0)))
    if return_sequences:  # the backward half starts at the last real step, and padded steps output zeros
        np.testing.assert_allclose(masked[:, :4], unpadded, atol=1e-6)
        np.testing.assert_array_equal(masked[:, 4:], 0.0)
    else:
        np.testing.assert_allclose(masked, unpadded, atol=1e-6)
    assert not np.allclose(np.asarray(layer(padded)), masked)  # without the mask the junk counts


def test_bidirectional_rnn_saves_and_reloads_as_kcp_layer(tmp_path):
    spec = SPECS["text"]
    model = build_model(spec, small_config("rnn", "model.bidirectional=true", "model.cell=lstm"))
    assert [type(layer).__name__ for layer in model.layers if layer.name.startswith("rnn")] == ["BidirectionalRNN"] * 2
    inputs = random_inputs(spec, 4)
    model.save(str(tmp_path / "m.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    assert type(reloaded.get_layer("rnn1_bidirectional")).__name__ == "BidirectionalRNN"
    assert reloaded.get_layer("rnn1_bidirectional").get_config()["cell"] == "lstm"
    np.testing.assert_array_equal(model.predict(inputs, verbose=0), reloaded.predict(inputs, verbose=0))


def test_rnn_text_masks_padding():
    spec = SPECS["text"]
    model = build_model(spec, small_config("rnn"))
    tokens = random_inputs(spec, 1)
    tokens[0, 5:] = 0
    longer_padding = tokens.copy()
    other = tokens.copy()
    other[0, 5:] = 7  # real tokens where padding was: must change the prediction
    same = model.predict(tokens, verbose=0)
    np.testing.assert_allclose(same, model.predict(longer_padding, verbose=0))
    assert not np.allclose(same, model.predict(other, verbose=0))


def test_rnn_time_pool_reads_only_real_steps():
    from trainer.models.rnn import masked_time_pool

    steps = -np.arange(1.0, 13.0, dtype=np.float32).reshape(3, 4, 1)  # every real output negative
    steps[0, 2:] = 0.0  # padded steps output zeros (BidirectionalRNN's zero_output_for_mask)
    padding = np.array([[True, True, False, False], [True, True, True, True], [False] * 4])
    np.testing.assert_array_equal(masked_time_pool(steps, padding, "max"), [[-1.0], [-5.0], [0.0]])
    np.testing.assert_allclose(masked_time_pool(steps, padding, "max_mean"), [[-1.0, -1.5], [-5.0, -6.5], [0.0, 0.0]])


def test_rnn_mean_pooling_consumes_the_steps_mask_without_keras_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "... will therefore destroy the mask information"
        model = build_model(SPECS["text"], small_config("rnn", "model.pooling=max_mean"))
    assert model.output.shape == (None, SPECS["text"].num_classes)


@pytest.mark.parametrize("pooling", ["last", "max", "max_mean"])
def test_rnn_text_prediction_is_the_same_however_long_the_padding(pooling):
    spec, short_spec = SPECS["text"], ModelInputs("text", (4,), 3, vocab_size=50, input_name="text")
    config = small_config("rnn", f"model.pooling={pooling}", "model.embedding_dropout=0.5")
    model, short = build_model(spec, config), build_model(short_spec, config)
    short.set_weights(model.get_weights())  # the same model on rows of 4 tokens instead of 10
    tokens = random_inputs(spec, 4)
    tokens[:, 3:] = 0
    tokens[3] = 0  # a row with no token
    padded = model.predict(tokens, verbose=0)
    np.testing.assert_allclose(padded, short.predict(tokens[:, :4], verbose=0), atol=1e-6)
    np.testing.assert_allclose(padded[3], 1 / 3, atol=1e-6)  # zeros pooled: the head's zero-bias softmax
    tokens[:, 3:] = 7  # real tokens where the padding was
    assert not np.allclose(padded[:3], model.predict(tokens, verbose=0)[:3])


def test_rnn_reads_images_row_by_row():
    model = build_model(SPECS["image"], small_config("rnn"))  # 8x8: no conv stem, the pixel rows
    assert model.get_layer("rows_as_steps").output.shape == (None, 8, 8)
    assert not any(layer.name.startswith("stem") for layer in model.layers)


def test_rnn_reads_larger_images_through_a_conv_stem():
    colour = ModelInputs("image", (32, 32, 3), 10, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = build_model(colour, small_config("rnn"))
    # two blocks of two 3x3 convolutions halve 32x32 to 8 rows: 8 steps of 8 x 64 values
    assert [model.get_layer(name).output.shape for name in ("stem1_pool", "stem2_pool")] == [
        (None, 16, 16, 32), (None, 8, 8, 64)]
    assert model.get_layer("rows_as_steps").output.shape == (None, 8, 512)
    odd = build_model(ModelInputs("image", (20, 12, 1), 10), small_config("rnn"))  # 20 -> 10 -> 5 rows
    assert odd.get_layer("rows_as_steps").output.shape == (None, 5, 3 * 64)
    rows = build_model(colour, small_config("rnn", "model.image_stem=rows"))
    assert rows.get_layer("rows_as_steps").output.shape == (None, 32, 96)
    assert np.isfinite(model.predict(random_inputs(colour, 4), verbose=0)).all()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_transformer_variants_save_and_reload(pooling, positional, tmp_path):
    spec = SPECS["text"]
    config = small_config("transformer", f"model.pooling={pooling}", f"model.positional={positional}")
    model = build_model(spec, config)
    inputs = random_inputs(spec, 3)
    model.save(str(tmp_path / "m.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(model.predict(inputs, verbose=0), reloaded.predict(inputs, verbose=0), atol=1e-6)
    has_table = any("position_encoding" in w.path for w in model.weights)
    assert has_table == (positional == "learned")


def test_sequences_get_wider_kernels_and_a_shallower_resnet_by_default():
    from trainer.models.cnn import default_kernel_size

    cnn = load_config([], ["model.name=cnn"]).model
    assert cnn.kernel_size is None
    assert [default_kernel_size(SPECS[m]) for m in ("image", "sequence", "text")] == [3, 5, 3]
    assert build_model(SPECS["sequence"], cnn).get_layer("block1_conv1").kernel.shape == (5, 3, 32)
    assert build_model(SPECS["image"], cnn).get_layer("block1_conv1").kernel.shape == (3, 3, 1, 32)
    told = load_config([], ["model.name=cnn", "model.kernel_size=7"]).model
    assert build_model(SPECS["sequence"], told).get_layer("block1_conv1").kernel.shape == (7, 3, 32)
    assert cnn.family.applied(SPECS["sequence"])["kernel_size"] == 5

    resnet = load_config([], ["model.name=resnet"]).model
    assert resnet.depth == 0
    sequence_net = build_model(SPECS["sequence"], resnet)  # one basic block a stage
    assert sequence_net.name == "resnet8_v1" and "conv4_block2_1_conv" not in [l.name for l in sequence_net.layers]
    assert build_model(SPECS["image"], resnet).name == "resnet20_v1"
    assert build_model(SPECS["sequence"], load_config([], ["model.name=resnet", "model.depth=20"]).model
                       ).name == "resnet20_v1"
    with pytest.raises(ConfigError, match="model.depth: 9 is not a ResNet depth"):
        load_config([], ["model.name=resnet", "model.depth=9"])

    # the resnet on sequences: 5-wide convolutions (stem and blocks) and 0.3 dropout before the classifier
    assert resnet.dropout is None and resnet.kernel_size is None
    assert sequence_net.get_layer("conv1_conv").kernel.shape == (5, 3, 16)
    assert sequence_net.get_layer("conv4_block1_2_conv").kernel.shape == (5, 64, 64)
    assert sequence_net.get_layer("conv4_block1_0_conv").kernel.shape == (1, 32, 64)  # the projection stays 1-wide
    assert sequence_net.get_layer("head_dropout").rate == 0.3
    image_net = build_model(SPECS["image"], resnet)
    assert image_net.get_layer("conv2_block1_1_conv").kernel.shape[:2] == (3, 3)
    assert image_net.get_layer("head_dropout").rate == 0.1
    assert resnet.family.applied(SPECS["sequence"]) == {"depth": 8, "width": 16, "kernel_size": 5, "dropout": 0.3}
    assert resnet.family.applied(SPECS["image"]) == {"depth": 20, "width": 16, "kernel_size": 3, "dropout": 0.1}
    set_keys = load_config([], ["model.name=resnet", "model.kernel_size=3", "model.dropout=0.2"]).model
    set_net = build_model(SPECS["sequence"], set_keys)
    assert set_net.get_layer("conv1_conv").kernel.shape == (3, 3, 16)
    assert set_net.get_layer("head_dropout").rate == 0.2
    assert build_model(SPECS["sequence"], load_config([], ["model.name=cnn"]).model).get_layer(
        "head_dropout").rate == 0.1  # null is 0.1 for every other family
    with pytest.raises(ConfigError, match="model.kernel_size: 5 applies to CIFAR-style depths"):
        load_config([], ["model.name=resnet", "model.depth=50", "model.kernel_size=5"])


def test_cnn_blocks_follow_the_image_size_by_default(capsys):
    from trainer.models.cnn import default_filters

    assert default_filters(ModelInputs("image", (8, 8, 1), 10)) == (32, 64)  # the digits: as before
    assert default_filters(ModelInputs("image", (28, 28, 1), 10)) == (32, 64, 128, 256)
    assert default_filters(ModelInputs("image", (32, 32, 3), 10)) == (32, 64, 128, 256)
    assert default_filters(ModelInputs("image", (224, 224, 3), 10)) == (32, 64, 128, 256, 256)
    assert default_filters(ModelInputs("sequence", (48, 1), 6)) == (32, 64)
    config = small_config("cnn", "model.filters=null")
    assert config.filters is None
    model = build_model(ModelInputs("image", (32, 32, 3), 10), config)
    assert model.get_layer("block4_conv2").output.shape == (None, 4, 4, 256)  # the last map is 4 wide
    assert not any(layer.name.startswith("block5") for layer in model.layers)
    digits = build_model(ModelInputs("image", (8, 8, 1), 10), config)
    assert digits.get_layer("block2_conv2").output.shape == (None, 4, 4, 64)
    assert not any(layer.name.startswith("block3") for layer in digits.layers)
    with pytest.raises(ConfigError, match="model.filters"):
        small_config("cnn", "model.filters=[]")
    from kcp import cli
    capsys.readouterr()
    assert cli.main(["describe-model", "--model", "cnn", "--input-shape", "32,32,3", "--num-classes", "10"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert "  filters: null (applied: [32, 64, 128, 256])" in lines
    augment = '{"flip": "none", "translation": %s, "rotation": 0.0, "zoom": 0.0, "contrast": 0.0}'
    assert f"  augment: {augment % 'null'} (applied: {augment % 0.125})" in lines  # images shift by default


def test_transformer_image_patches():
    config = small_config("transformer", "model.patch_size=4")
    model = build_model(ModelInputs("image", (32, 32, 3), 10), config)
    assert model.get_layer("patches").output.shape == (None, 64, 32)
    # the default conv stem: 4x4 patches read by two blocks of (two 3x3 convolutions, a 2x2 max pool) from the
    # pixels (32x32x3 -> 16x16x16 -> 8x8x32), a 1x1 projection, then two 3x3 convolutions over the 8x8 patch grid
    assert [model.get_layer(name).output.shape for name in ("stem_pixels1_pool", "stem_pixels2_pool",
                                                            "patch_embedding")] == [
        (None, 16, 16, 16), (None, 8, 8, 32), (None, 8, 8, 32)]
    assert [model.get_layer(name).output.shape for name in ("stem_conv1", "stem_conv2")] == [(None, 8, 8, 32)] * 2
    linear = build_model(ModelInputs("image", (32, 32, 3), 10), small_config("transformer", "model.patch_size=4",
                                                                             "model.image_stem=linear"))
    assert not any(layer.name.startswith("stem_") for layer in linear.layers)
    assert linear.get_layer("patch_embedding").kernel.shape == (4, 4, 3, 32)  # ViT's linear patch projection
    blocks = (3 * 3 * 3 * 16 + 4 * 16) + (3 * 3 * 16 * 16 + 4 * 16) + (  # each convolution's kernel, its batch norm's
        3 * 3 * 16 * 32 + 4 * 32) + (3 * 3 * 32 * 32 + 4 * 32)           # gamma, beta, moving mean and variance
    stem = blocks + (32 * 32 + 32) + 2 * (3 * 3 * 32 * 32 + 32)
    assert model.count_params() - linear.count_params() == stem - (4 * 4 * 3 * 32 + 32)
    # an odd patch side: a block per factor 2, then a kernel-and-stride-3 convolution (36 / 6 = 6 patches a side)
    odd = build_model(ModelInputs("image", (36, 36, 3), 10), small_config("transformer", "model.patch_size=6"))
    assert odd.get_layer("stem_pixels2").kernel.shape == (3, 3, 16, 32)
    assert odd.get_layer("patches").output.shape == (None, 36, 32)
    # the digits' 1x1 patches have no pixel stem: the same model as before
    digits = build_model(ModelInputs("image", (8, 8, 1), 10), small_config("transformer", "model.patch_size=0"))
    assert not any(layer.name.startswith("stem_pixels") for layer in digits.layers)
    assert digits.get_layer("patch_embedding").kernel.shape == (1, 1, 1, 32)


def test_attention_scores_per_block_and_head(tmp_path):
    spec = SPECS["text"]
    config = small_config("transformer", "model.layers=3")
    model = build_model(spec, config)
    model.save(str(tmp_path / "m.keras"))
    model = keras.saving.load_model(str(tmp_path / "m.keras"))
    tokens = random_inputs(spec, 2)
    tokens[0, 4:] = 0
    scores = attention_scores(model, tokens)
    assert [layer.name for layer in attention_layers(model)] == ["block1_attention", "block2_attention",
                                                                 "block3_attention"]
    assert len(scores) == 3 and scores[0].shape == (2, 2, 10, 10)
    np.testing.assert_allclose(scores[1].sum(axis=-1), 1.0, atol=1e-5)
    assert np.abs(scores[2][0, :, :, 4:]).max() < 1e-6  # nobody attends to padding


def test_normalization_uses_the_contract_statistics_and_is_not_adapted():
    model = build_model(SPECS["sequence"], small_config("cnn"))
    layer = model.get_layer("normalize")
    np.testing.assert_allclose(np.ravel(layer.mean), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(np.ravel(layer.variance), [1.0, 4.0, 9.0])
    assert not layer.trainable_weights


def test_augmentation_layers_act_only_in_training():
    config = small_config("cnn", "model.augment.flip=horizontal", "model.augment.rotation=0.1",
                          "model.augment.contrast=0.2")
    model = build_model(SPECS["image"], config)
    augment = model.get_layer("augment")
    images = random_inputs(SPECS["image"], 4)
    np.testing.assert_array_equal(np.asarray(augment(images, training=False)), images)
    assert not np.allclose(np.asarray(augment(images, training=True)), images)


def test_images_larger_than_16x16_are_shifted_by_default_and_nothing_else_is():
    colour = ModelInputs("image", (32, 32, 3), 10, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = build_model(colour, small_config("cnn"))
    shift = model.get_layer("augment").get_layer("augment_translation")
    assert (shift.height_factor, shift.width_factor) == (0.125, 0.125)
    assert [layer.name for layer in model.get_layer("augment").layers] == ["augment_translation"]
    off = build_model(colour, small_config("cnn", "model.augment.translation=0"))
    assert not any(layer.name == "augment" for layer in off.layers)
    # the 8x8 digits (and anything up to 16 pixels on a side) are not shifted unless asked
    for shape in ((8, 8, 1), (16, 16, 3), (16, 64, 3)):
        plain = build_model(ModelInputs("image", shape, 10), small_config("cnn"))
        assert not any(layer.name == "augment" for layer in plain.layers), shape
    asked = build_model(SPECS["image"], small_config("cnn", "model.augment.translation=0.1"))
    assert asked.get_layer("augment").get_layer("augment_translation").height_factor == 0.1
    for modality in ("sequence", "text"):  # the null default adds nothing there, and refuses nothing
        assert not any(layer.name == "augment" for layer in build_model(SPECS[modality], small_config("cnn")).layers)
    with pytest.raises(ConfigError, match="model.augment: augmentation layers apply to images, not sequence"):
        build_model(SPECS["sequence"], small_config("cnn", "model.augment.translation=0.1"))


def test_augmentation_is_refused_for_sequences():
    with pytest.raises(ConfigError, match="model.augment: augmentation layers apply to images"):
        build_model(SPECS["sequence"], small_config("cnn", "model.augment.zoom=0.1"))


@pytest.mark.parametrize("family, expected", [("cnn", "he_normal"), ("rnn", "glorot_uniform")])
def test_family_default_initializers_and_override(family, expected):
    from trainer.models.common import initializer_for

    assert initializer_for(small_config(family)) == expected
    assert initializer_for(small_config(family, "model.initializer=glorot_normal")) == "glorot_normal"


def test_input_spec_errors_are_clear():
    with pytest.raises(ConfigError, match=r"input shape \(8, 8\) does not fit modality 'image'"):
        ModelInputs("image", (8, 8), 10)
    with pytest.raises(ConfigError, match="model.dim: 30 is not divisible by model.heads"):
        load_config([], ["model.name=transformer", "model.dim=30", "model.heads=4"])


@pytest.mark.parametrize("family", tuple(MODEL_FAMILIES))
def test_each_family_s_default_tuning_space_is_valid_for_that_family(family):
    from tuning.space import search_space

    config = load_config([], [f"model.name={family}"])
    space = search_space(config)
    assert space == MODEL_FAMILIES[family].search_space and space
    assert any(key.startswith("model.") for key in space)  # it searches the family's own keys


def text_with_empty_rows(spec, count, seed=0):
    """Token ids whose class is marked by one token (id 2 + class) among filler ids; every 8th row
    is all padding, as a text that tokenizes to nothing (`}`, `~~ ^<<<<`) is."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, spec.num_classes, count)
    tokens = random_inputs(spec, count, seed)
    tokens = np.where(tokens > 0, 2 + spec.num_classes + tokens % (spec.vocab_size - 2 - spec.num_classes), 0)
    tokens[np.arange(count), rng.integers(0, 3, count)] = 2 + labels  # within the 3 real tokens every row has
    tokens[::8] = 0
    return tokens.astype(np.int32), labels


@pytest.mark.parametrize("family, extra", [("transformer", "model.pooling=mean"), ("transformer", "model.pooling=cls"),
                                           ("rnn", "model.bidirectional=true"), ("cnn", "model.dropout=0.0"),
                                           ("resnet", "model.dropout=0.0")])
def test_text_rows_with_no_token_train_to_a_finite_loss(family, extra):
    spec = SPECS["text"]
    keras.utils.set_random_seed(4)
    momentum = batch_norm_momentum_for(4 * 8)  # as the trainer sets it: 4 epochs of 8 steps
    model = build_model(spec, small_config(family, extra, f"model.batch_norm_momentum={momentum}"))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    tokens, labels = text_with_empty_rows(spec, 256)
    assert np.all(model.predict(tokens[:16], verbose=0) >= 0)  # finite: NaN fails every comparison
    history = model.fit(tokens, labels, batch_size=32, epochs=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history["loss"]
    test_tokens, test_labels = text_with_empty_rows(spec, 128, seed=1)
    real = test_tokens.any(axis=1)
    probabilities = model.predict(test_tokens, verbose=0)
    assert np.all(np.isfinite(probabilities))
    accuracy = float(np.mean(probabilities[real].argmax(axis=1) == test_labels[real]))
    assert accuracy >= 0.6, accuracy  # chance is 1/3


GRAMS = ModelInputs("text", (10,), 3, vocab_size=50, input_name="text", char_ngram_length=12, char_ngram_buckets=64)


def text_classed_by_grams(count, seed=0):
    """Text inputs (10 token ids, then 12 n-gram ids) whose tokens are noise and whose class is the n-gram
    id 2 + class among filler n-gram ids; the tails of both parts are padding."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, GRAMS.num_classes, count)
    tokens = random_inputs(ModelInputs("text", (10,), 3, vocab_size=50, input_name="text"), count, seed)
    grams = rng.integers(5, GRAMS.char_ngram_buckets, size=(count, GRAMS.char_ngram_length))
    grams[:, 0] = 2 + labels
    grams[np.arange(GRAMS.char_ngram_length)[None, :] >= rng.integers(2, 13, count)[:, None]] = 0
    return np.concatenate([tokens, grams], axis=1).astype(np.int32), labels


@pytest.mark.parametrize("family", families_for("text"))
def test_every_text_classifier_reads_the_character_ngrams_beside_its_tokens(family, tmp_path):
    model = build_model(GRAMS, small_config(family))
    assert model.input.shape == (None, 10 + 12)
    names = {layer.name for layer in model.layers}
    assert {"char_ngram_embedding", "char_ngram_pool", "char_ngram_norm", "with_char_ngrams"} <= names
    assert model.get_layer("char_ngram_embedding").input_dim == 64
    assert model.get_layer("char_ngram_embedding").output_dim == 32  # model.char_ngram_dim
    assert not {"char_ngram_embedding", "with_char_ngrams"} & {layer.name for layer in
                                                              build_model(SPECS["text"], small_config(family)).layers}
    # the class is in the n-grams alone: the model learns it there
    keras.utils.set_random_seed(5)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"])
    inputs, labels = text_classed_by_grams(384)
    model.fit(inputs, labels, batch_size=32, epochs=6, verbose=0)
    test_inputs, test_labels = text_classed_by_grams(128, seed=1)
    accuracy = float(np.mean(model.predict(test_inputs, verbose=0).argmax(axis=1) == test_labels))
    assert accuracy >= 0.9, accuracy  # chance is 1/3
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.testing.assert_array_equal(model.predict(test_inputs, verbose=0),
                                  keras.saving.load_model(path).predict(test_inputs, verbose=0))


def test_transformer_sequence_stem_convolves_neighbouring_steps_by_default():
    spec = SPECS["sequence"]
    model = build_model(spec, small_config("transformer"))
    names = {layer.name for layer in model.layers}
    assert {"stem_conv1", "stem_conv2"} <= names and "step_projection" not in names
    scores = attention_scores(model, random_inputs(spec, 2))
    assert scores[0].shape == (2, 2, spec.shape[0], spec.shape[0])  # one token per step, as with the projection
    stem = keras.Model(model.input, model.get_layer("stem_conv2").output)  # (batch, steps, dim)
    steps = random_inputs(spec, 1)
    nudged = steps.copy()
    nudged[0, 0] += 50.0
    changed = np.abs(np.asarray(stem(nudged)) - np.asarray(stem(steps))).max(axis=-1)[0]  # (steps,)
    assert np.all(changed[:7] > 0) and np.all(changed[7:] == 0)  # each token sees 6 steps either side: 13 in all
    linear = build_model(spec, small_config("transformer", "model.sequence_stem=linear"))
    assert "step_projection" in {layer.name for layer in linear.layers}


def test_a_feature_constant_in_training_is_centred_not_divided_by_zero():
    """std 0 (a constant column) normalises with scale 1, as scikit-learn's StandardScaler does: a served
    5.001 against the trained 5.0 is 0.001 off, not 10,000 standard deviations."""
    import keras

    from kcp.core.config import ModelConfig
    from trainer.models.common import ModelInputs, model_input

    spec = ModelInputs("sequence", (4, 2), 3, mean=(1.0, 5.0), std=(2.0, 0.0), input_name="sequence")
    inputs, normalized = model_input(spec, ModelConfig())
    model = keras.Model(inputs, normalized)
    out = keras.ops.convert_to_numpy(model(np.array([[[3.0, 5.001]] * 4], np.float32)))
    np.testing.assert_allclose(out[0, 0], [1.0, 0.001], atol=1e-5)


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-12])
def test_series_of_huge_or_tiny_values_normalise_to_unit_scale(scale):
    """Series around 1e20 have a variance near 1e40, beyond float32: the Normalization layer held
    inf, every input became 0 (a model at chance) and the export failed on the config. Around
    1e-12, the layer's epsilon (std 1e-7 at least) squashed them 100,000 times. A power of ten
    divides them first now; inputs of ordinary scale keep the one layer."""
    import keras

    from kcp.core.config import ModelConfig
    from trainer.models.common import ModelInputs, model_input

    spec = ModelInputs("sequence", (4, 2), 3, mean=(1.0 * scale, -3.0 * scale), std=(2.0 * scale, 0.5 * scale),
                       input_name="sequence")
    inputs, normalized = model_input(spec, ModelConfig())
    model = keras.Model(inputs, normalized)
    values = np.array([[[3.0 * scale, -2.0 * scale]] * 4], np.float32)
    out = keras.ops.convert_to_numpy(model(values))
    np.testing.assert_allclose(out[0, 0], [1.0, 2.0], rtol=1e-5)
    assert "prescale" in {layer.name for layer in model.layers}
    ordinary = keras.Model(*model_input(ModelInputs("sequence", (4, 2), 3, mean=(1.0, 5.0), std=(2.0, 1e-3),
                                                    input_name="sequence"), ModelConfig()))
    assert "prescale" not in {layer.name for layer in ordinary.layers}
    mixed = keras.Model(*model_input(ModelInputs("sequence", (4, 2), 3, mean=(0.0, 5.0), std=(scale, 2.0),
                                                 input_name="sequence"), ModelConfig()))  # one feature's scale only
    out = keras.ops.convert_to_numpy(mixed(np.array([[[scale, 7.0]] * 4], np.float32)))
    np.testing.assert_allclose(out[0, 0], [1.0, 1.0], rtol=1e-5)  # one power of ten for both left [1, 2e-9]


def test_normalization_stays_float32_under_mixed_precision():
    """Under mixed_float16 the layer's variance became float16: a std above 256 (variance 65504) was
    inf and every input 0."""
    import keras

    from kcp.core.config import ModelConfig
    from trainer.models.common import ModelInputs, model_input

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Model(*model_input(ModelInputs("sequence", (4, 2), 3, mean=(0.0, 5.0), std=(300.0, 2.0),
                                                     input_name="sequence"), ModelConfig()))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = keras.ops.convert_to_numpy(model(np.array([[[300.0, 7.0]] * 4], np.float32)))
    np.testing.assert_allclose(out[0, 0], [1.0, 1.0], rtol=1e-3)


def test_a_long_series_is_cut_into_patches_of_steps_so_attention_fits():
    """2,000 steps a token took over 9 GB in the transformer's first step at batch 64 (attention is
    tokens^2 per head): above 256 steps, the stem's second convolution strides by the patch, as
    `model.sequence_patch` (0: enough for 256 tokens; 1 up to 256 steps, so the table's series keep
    a token a step), and the linear stem becomes a patch projection."""
    import keras

    from trainer.models.transformer import TransformerConfig

    def tokens(steps, *extra):
        spec = ModelInputs("sequence", (steps, 2), 3, mean=(0.0, 0.0), std=(1.0, 1.0), input_name="sequence")
        model = build_model(spec, small_config("transformer", *extra))
        return model.get_layer("position_encoding").output.shape[1], model, spec

    assert tokens(48)[0] == 48 and tokens(256)[0] == 256
    count, model, spec = tokens(2000)
    assert count == 250
    assert np.isfinite(keras.ops.convert_to_numpy(model(random_inputs(spec, 2)))).all()
    assert tokens(40, "model.sequence_patch=4")[0] == 10
    count, linear, _ = tokens(1000, "model.sequence_stem=linear")
    assert count == 250 and isinstance(linear.get_layer("step_projection"), keras.layers.Conv1D)
    assert TransformerConfig().applied(spec) == {"sequence_patch": 8}
    with pytest.raises(ConfigError, match=r"^model.sequence_patch: 50 is longer than the sequence \(40 steps\)$"):
        tokens(40, "model.sequence_patch=50")
