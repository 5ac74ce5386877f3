import json

import numpy as np
import pytest

from kcp.core import contract as contract_lib

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
    serialized = example_lib.encode_example(contract.input_spec, "image", "k/1", image, 1)
    inputs, labels, keys = example_lib.parse_examples(contract, [serialized, serialized])
    assert inputs.dtype.name == "uint8"
    np.testing.assert_array_equal(inputs.numpy(), np.stack([image, image]))
    assert labels.numpy().tolist() == [1, 1]
    assert keys.numpy().tolist() == [b"k/1", b"k/1"]


def test_sequence_example_encodes_and_parses_back():
    spec = FeatureSpec(dtype="float32", shape=(5, 2), encoding="float_list")
    contract = make_contract(modality="sequence", input_feature="sequence", input_spec=spec)
    sequence = np.linspace(-1, 1, 10, dtype=np.float32).reshape(5, 2)
    serialized = example_lib.encode_example(spec, "sequence", "s", sequence, 0)
    inputs, labels, _ = example_lib.parse_examples(contract, [serialized])
    np.testing.assert_allclose(inputs.numpy()[0], sequence)
    assert labels.numpy().tolist() == [0]


def test_encode_rejects_a_wrong_shape():
    contract = make_contract()
    with pytest.raises(ValueError, match=r"k: shape \(4, 3\) does not match the contract's \(4, 3, 2\)"):
        example_lib.encode_example(contract.input_spec, "image", "k", np.zeros((4, 3), np.uint8), 0)
