import json
import os

import keras
import numpy as np
import tensorflow as tf

from deploy.validate import export_accuracy, predict_split
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib


def test_export_predictions_equal_the_keras_model(digits_run):
    contract = contract_lib.read_contract(digits_run)
    model = keras.saving.load_model(os.path.join(digits_run, "train", "model.keras"))
    exported = predict_split(os.path.join(digits_run, "export", "model", "1"), digits_run, "test")
    inputs = np.concatenate([batch.numpy() for batch, _, _ in example_lib.read_split(
        contract, contract_lib.data_dir(digits_run), "test", 64)])
    expected = model.predict(inputs.astype(np.float32), verbose=0)
    np.testing.assert_allclose(exported["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(exported["class_ids"], expected.argmax(axis=-1))
    assert len(exported["labels"]) == contract.splits["test"].count


def test_export_accuracy_equals_the_trainers(digits_run):
    with open(os.path.join(digits_run, "train", "metrics.json")) as handle:
        trainer_accuracy = json.load(handle)["test"]["accuracy"]
    accuracy = export_accuracy(os.path.join(digits_run, "export", "model", "1"), digits_run)
    assert abs(accuracy - trainer_accuracy) <= 0.002


def test_signatures_take_raw_bytes_and_uint8_and_return_names(digits_run):
    loaded = tf.saved_model.load(os.path.join(digits_run, "export", "model", "1"))
    (spec,) = loaded.signatures["serve_images"].structured_input_signature[1].values()
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 8, 8, 1]
    (spec,) = loaded.signatures["serving_default"].structured_input_signature[1].values()
    assert spec.dtype == tf.string and spec.name == "image_bytes"
    outputs = loaded.signatures["serve_images"](image=tf.zeros([2, 8, 8, 1], tf.uint8))
    assert set(outputs) == {"class_ids", "class_names", "probabilities"}
    names = [n.decode() for n in outputs["class_names"].numpy()]
    assert names == [str(i) for i in outputs["class_ids"].numpy()]
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    jpeg = tf.io.encode_jpeg(tf.zeros([32, 40, 3], tf.uint8))  # another format, size and colour
    from_bytes = loaded.signatures["serving_default"](image_bytes=tf.stack([jpeg]))
    np.testing.assert_allclose(from_bytes["probabilities"], outputs["probabilities"][:1], atol=1e-6)


def test_serve_examples_needs_only_the_input_feature(digits_run):
    """A client classifying new data sends tf.train.Examples holding the input alone: no key, no label."""
    contract = contract_lib.read_contract(digits_run)
    loaded = tf.saved_model.load(os.path.join(digits_run, "export", "model", "1"))
    full = [record.numpy() for record in tf.data.TFRecordDataset(
        contract.split_files(contract_lib.data_dir(digits_run), "test")).take(4)]
    bare = []
    for record in full:
        example = tf.train.Example.FromString(record)
        feature = example.features.feature
        assert contract_lib.KEY_FEATURE in feature and contract_lib.LABEL_FEATURE in feature
        del feature[contract_lib.KEY_FEATURE], feature[contract_lib.LABEL_FEATURE]
        bare.append(example.SerializeToString())
    serve = loaded.signatures["serve_examples"]
    by_full = serve(examples=tf.constant(full))["probabilities"].numpy()
    by_bare = serve(examples=tf.constant(bare))["probabilities"].numpy()
    np.testing.assert_allclose(by_bare, by_full, atol=1e-6)


def test_no_temporary_directory_is_left_behind(digits_run):
    assert [name for name in os.listdir(os.path.join(digits_run, "export", "model")) if not name.isdigit()] == []


def test_original_files_get_the_predictions_of_the_pipelines_pixels(digits_run, tmp_path):
    """serving_default on a file's own bytes (other sizes, formats and channels than the 8x8 gray
    training images; BMP and GIF too, which TensorFlow cannot decode to one channel) predicts what
    serve_images predicts on the pipeline's decoding of the same file."""
    from kcp.core.sources.images import decode_image_file
    from tests.deploy.test_images import encode, picture

    loaded = tf.saved_model.load(os.path.join(digits_run, "export", "model", "1"))
    files = [("PNG", "L", (64, 64)), ("PNG", "RGBA", (20, 30)), ("JPEG", "RGB", (40, 24)), ("JPEG", "L", (5, 6)),
             ("BMP", "RGB", (5, 7)), ("BMP", "L", (33, 33)), ("GIF", "P", (30, 30)), ("GIF", "L", (9, 9))]
    contents, pipeline_pixels = [], []
    for index, (fmt, mode, size) in enumerate(files):
        path = tmp_path / f"{index}.{fmt.lower()}"
        path.write_bytes(encode(picture(*size, mode), fmt))
        contents.append(path.read_bytes())
        pipeline_pixels.append(decode_image_file(str(path), (8, 8, 1)))
    by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(contents))["probabilities"].numpy()
    by_pixels = loaded.signatures["serve_images"](image=tf.constant(np.stack(pipeline_pixels)))["probabilities"]
    np.testing.assert_allclose(by_bytes, by_pixels.numpy(), atol=1e-6)


def test_bytes_that_are_no_image_fail_with_their_cause(digits_run):
    from deploy.predict import failure_reason
    from deploy.serving.codec import error_message

    serve = tf.saved_model.load(os.path.join(digits_run, "export", "model", "1")).signatures["serving_default"]
    png = tf.io.encode_png(tf.zeros([8, 8, 1], tf.uint8)).numpy()
    try:
        serve(image_bytes=tf.constant([png, b"hello"]))
        raise AssertionError("no error")
    except tf.errors.InvalidArgumentError as error:
        assert error_message(error) == "instance 1: not a PNG, JPEG, GIF or BMP image"
    try:
        serve(image_bytes=tf.constant([png[:30]]))  # a PNG cut short
        raise AssertionError("no error")
    except tf.errors.InvalidArgumentError as error:
        assert error_message(error) == "could not decode the image (Invalid PNG. Failed to initialize decoder.)"
        assert failure_reason(error) == ("prediction failed (InvalidArgumentError: could not decode the image "
                                         "(Invalid PNG. Failed to initialize decoder.))")
