import numpy as np

from kcp.core.config_load import load_config
from pipeline.augment import augment_image, augment_sequence, augment_text, augmented_copies, rng_for


def augment_config(*overrides):
    return load_config([], [f"data.augment.{o}" for o in overrides]).data.augment


IMAGE = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)


def test_copies_are_deterministic_per_key_and_copy():
    config = augment_config("copies=3", "cutout=0.25")
    first = augmented_copies("k1", IMAGE, "image", config)
    again = augmented_copies("k1", IMAGE, "image", config)
    assert [key for key, _ in first] == ["k1#aug1", "k1#aug2", "k1#aug3"]
    for (_, a), (_, b) in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][1], first[1][1])
    other_key = augmented_copies("k2", IMAGE, "image", config)
    assert not np.array_equal(first[0][1], other_key[0][1])


def test_image_augmentation_keeps_shape_and_dtype_and_changes_pixels():
    out = augment_image(IMAGE, augment_config(), rng_for("k", 1))
    assert out.shape == IMAGE.shape and out.dtype == np.uint8
    assert not np.array_equal(out, IMAGE)


def test_flip_is_off_by_default_and_mirrors_when_on():
    only_flip = ["crop_padding=0", "rotation=0", "brightness=0", "contrast=0"]
    unflipped = [augment_image(IMAGE, augment_config(*only_flip), rng_for("k", c)) for c in range(1, 9)]
    assert all(np.array_equal(x, IMAGE) for x in unflipped)
    flipped = [augment_image(IMAGE, augment_config(*only_flip, "flip=true"), rng_for("k", c)) for c in range(1, 9)]
    assert any(np.array_equal(x, IMAGE[:, ::-1]) for x in flipped)
    assert all(np.array_equal(x, IMAGE) or np.array_equal(x, IMAGE[:, ::-1]) for x in flipped)


def test_cutout_zeroes_a_square():
    bright = np.full((10, 10, 1), 200, np.uint8)
    config = augment_config("crop_padding=0", "rotation=0", "brightness=0", "contrast=0", "cutout=0.3")
    out = augment_image(bright, config, rng_for("k", 1))
    assert (out == 0).sum() == 9 and (out == 200).sum() == 91


def test_sequence_augmentation():
    sequence = np.sin(np.linspace(0, 6, 40, dtype=np.float32))[:, None] * np.array([1.0, 2.0], np.float32)
    out = augment_sequence(sequence, augment_config(), rng_for("s", 1))
    assert out.shape == sequence.shape and out.dtype == np.float32
    assert not np.allclose(out, sequence)
    shifted = augment_sequence(sequence, augment_config("scale=0", "noise=0", "time_shift=0.25"), rng_for("s", 2))
    assert any(np.allclose(shifted, np.roll(sequence, k, axis=0)) for k in range(-10, 11))
    # the amplitude scales about each feature's mean: a constant (or an offset) stays where it was
    offset = np.concatenate([sequence[:, :1] + 300.0, np.full((40, 1), 5.0, np.float32)], axis=1)
    scaled = augment_sequence(offset, augment_config("scale=0.2", "noise=0", "time_shift=0"), rng_for("s", 3))
    assert not np.allclose(scaled[:, 0], offset[:, 0])
    np.testing.assert_allclose(scaled.mean(axis=0), offset.mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(scaled[:, 1], offset[:, 1])


def test_text_augmentation_deletes_and_swaps_but_keeps_a_word():
    text = "the quick brown fox jumps over the lazy dog"
    out = augment_text(text, augment_config("token_delete=0.3", "token_swap=0.2"), rng_for("t", 1))
    assert out != text and set(out.split()) <= set(text.split())
    assert augment_text("alone", augment_config("token_delete=0.9"), rng_for("t", 1)) == "alone"
