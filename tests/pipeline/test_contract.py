import json

import numpy as np
import pytest
import tensorflow as tf

from kcp.core import contract as contract_lib
from kcp.core import example_proto
from kcp.core import examples as example_lib
from kcp.core.contract import ContractError, DataContract, FeatureSpec, SplitInfo


def make_contract(**changes) -> DataContract:
    values = dict(
        modality="image",
        input_feature="image",
        input_spec=FeatureSpec(dtype="uint8", shape=(4, 3, 2), encoding="raw_bytes"),
        class_names=("cat", "dog"),
        splits={"train": SplitInfo(count=3, num_shards=1, file_pattern="train-*-of-00001.tfrecord")},
        statistics={"mean": [1.0, 2.0], "std": [0.5, 0.25], "class_counts": {"cat": 2, "dog": 1}},
        source="test",
    )
    values.update(changes)
    return DataContract(**values)


def test_write_then_read_round_trip(tmp_path):
    contract = make_contract()
    path = contract_lib.write_contract(str(tmp_path), contract)
    assert path == str(tmp_path / "data" / "metadata.json")
    assert contract_lib.read_contract(str(tmp_path)) == contract
    assert (tmp_path / "data" / "labels.txt").read_text() == "cat\ndog\n"
    assert not [p.name for p in (tmp_path / "data").iterdir() if ".tmp" in p.name]


def test_unknown_format_version_is_rejected(tmp_path):
    contract_lib.write_contract(str(tmp_path), make_contract())
    path = tmp_path / "data" / "metadata.json"
    plain = json.loads(path.read_text())
    plain["format_version"] = 99
    path.write_text(json.dumps(plain))
    with pytest.raises(ContractError, match=r"metadata.json: format_version 99 is not supported \(this kcp reads 1\)"):
        contract_lib.read_contract(str(tmp_path))


@pytest.mark.parametrize("mutate, message", [
    (lambda plain: plain.pop("class_names"), "missing key 'class_names'"),
    (lambda plain: plain.update(surprise=1), "unknown key 'surprise'"),
    (lambda plain: plain.update(modality="audio"), "modality 'audio' is not one of image, sequence"),
])
def test_malformed_metadata_is_rejected_naming_the_key(tmp_path, mutate, message):
    contract_lib.write_contract(str(tmp_path), make_contract())
    path = tmp_path / "data" / "metadata.json"
    plain = json.loads(path.read_text())
    mutate(plain)
    path.write_text(json.dumps(plain))
    with pytest.raises(ContractError, match=message):
        contract_lib.read_contract(str(tmp_path))


def test_missing_metadata_says_what_to_run(tmp_path):
    with pytest.raises(ContractError, match="not found; run `kcp preprocess"):
        contract_lib.read_contract(str(tmp_path))


def test_invalid_json_is_a_contract_error():
    with pytest.raises(ContractError, match="not valid JSON"):
        DataContract.from_json("{", where="x/metadata.json")


def test_image_example_encodes_and_parses_back():
    contract = make_contract()
    image = np.arange(24, dtype=np.uint8).reshape(4, 3, 2)
    serialized = example_proto.encode_example(contract.input_spec, "image", "k/1", image, 1)
    inputs, labels, keys = example_lib.parse_examples(contract, [serialized, serialized])
    assert inputs.dtype.name == "uint8"
    np.testing.assert_array_equal(inputs.numpy(), np.stack([image, image]))
    assert labels.numpy().tolist() == [1, 1]
    assert keys.numpy().tolist() == [b"k/1", b"k/1"]


def test_sequence_example_encodes_and_parses_back():
    spec = FeatureSpec(dtype="float32", shape=(5, 2), encoding="float_list")
    contract = make_contract(modality="sequence", input_feature="sequence", input_spec=spec)
    sequence = np.linspace(-1, 1, 10, dtype=np.float32).reshape(5, 2)
    serialized = example_proto.encode_example(spec, "sequence", "s", sequence, 0)
    inputs, labels, _ = example_lib.parse_examples(contract, [serialized])
    np.testing.assert_allclose(inputs.numpy()[0], sequence)
    assert labels.numpy().tolist() == [0]


def _tf_example(features: dict) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def test_the_examples_written_without_tensorflow_are_tensorflows_bytes():
    """The pipeline's encoder (no TensorFlow) gives byte for byte what tf.train.Example gives,
    and its decoder reads back what parse_examples reads."""
    rng = np.random.default_rng(3)
    key = tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"train/0001"]))
    label = tf.train.Feature(int64_list=tf.train.Int64List(value=[7]))
    image_spec = FeatureSpec(dtype="uint8", shape=(5, 4, 3), encoding="raw_bytes")
    sequence_spec = FeatureSpec(dtype="float32", shape=(6, 2), encoding="float_list")
    text_spec = FeatureSpec(dtype="string", shape=(), encoding="utf8")
    image = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    sequence = rng.normal(size=(6, 2)).astype(np.float32)
    cases = [
        (image_spec, "image", image, tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()]))),
        (sequence_spec, "sequence", sequence, tf.train.Feature(float_list=tf.train.FloatList(value=sequence.ravel()))),
        (text_spec, "text", "héllo, {wörld} ~~", tf.train.Feature(bytes_list=tf.train.BytesList(
            value=["héllo, {wörld} ~~".encode()]))),
    ]
    for spec, name, inputs, feature in cases:
        serialized = example_proto.encode_example(spec, name, "train/0001", inputs, 7)
        assert serialized == _tf_example({"key": key, "label": label, name: feature}), name
        decoded_key, decoded = example_proto.decode_example(spec, name, serialized)
        assert decoded_key == "train/0001"
        if isinstance(inputs, str):
            assert decoded == inputs
        else:
            np.testing.assert_array_equal(decoded, inputs)
            assert decoded.dtype == inputs.dtype
    tokens = rng.integers(0, 300, 33)
    block = example_proto.encode_language_block("tokens", "train/00000/000001", tokens)
    assert block == _tf_example({"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"train/00000/000001"])),
                                 "tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=tokens))})


def test_encode_rejects_a_wrong_shape():
    contract = make_contract()
    with pytest.raises(ValueError, match=r"k: shape \(4, 3\) does not match the contract's \(4, 3, 2\)"):
        example_proto.encode_example(contract.input_spec, "image", "k", np.zeros((4, 3), np.uint8), 0)
