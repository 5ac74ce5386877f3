"""The `tf.train.Example` wire format without TensorFlow: writing the contract's examples (the
pipeline) and reading them back in plain Python (the pipeline's samples figure).

The pipeline's driver and workers never import TensorFlow (about 5 s and 0.5 GB per process):
the messages are built here from the descriptors of tensorflow/core/example/{example,feature}.proto,
in a private descriptor pool, so they cannot clash with TensorFlow's own when both are loaded.
The serialized bytes equal `tf.train.Example(...).SerializeToString(deterministic=True)`
(tests/pipeline/test_contract.py compares them). Parsing into tensors, for training and
serving, is kcp/core/examples.py, which imports TensorFlow.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from kcp.core.contract import KEY_FEATURE, LABEL_FEATURE, FeatureSpec

_F = descriptor_pb2.FieldDescriptorProto


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """example.proto and feature.proto of tensorflow/core/example, as one proto3 file."""
    proto = descriptor_pb2.FileDescriptorProto(name="kcp/tensorflow_example.proto", package="tensorflow",
                                               syntax="proto3")

    def message(name: str, *fields, nested=None, map_entry: bool = False, oneof: str | None = None):
        described = proto.message_type.add() if nested is None else nested
        described.name = name
        if map_entry:
            described.options.map_entry = True
        if oneof:
            described.oneof_decl.add(name=oneof)
        for number, (field_name, field_type, label, type_name) in enumerate(fields, start=1):
            field = described.field.add(name=field_name, number=number, type=field_type, label=label,
                                        json_name=field_name)
            if type_name:
                field.type_name = type_name
            if oneof:
                field.oneof_index = 0
        return described

    repeated, optional = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
    message("BytesList", ("value", _F.TYPE_BYTES, repeated, None))
    message("FloatList", ("value", _F.TYPE_FLOAT, repeated, None))
    message("Int64List", ("value", _F.TYPE_INT64, repeated, None))
    message("Feature", ("bytes_list", _F.TYPE_MESSAGE, optional, ".tensorflow.BytesList"),
            ("float_list", _F.TYPE_MESSAGE, optional, ".tensorflow.FloatList"),
            ("int64_list", _F.TYPE_MESSAGE, optional, ".tensorflow.Int64List"), oneof="kind")
    features = message("Features", ("feature", _F.TYPE_MESSAGE, repeated, ".tensorflow.Features.FeatureEntry"))
    message("FeatureEntry", ("key", _F.TYPE_STRING, optional, None),
            ("value", _F.TYPE_MESSAGE, optional, ".tensorflow.Feature"),
            nested=features.nested_type.add(), map_entry=True)
    message("Example", ("features", _F.TYPE_MESSAGE, optional, ".tensorflow.Features"))
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))


def _serialize(features: dict) -> bytes:
    # deterministic: the feature map's order would otherwise differ between processes.
    return Example(features={"feature": features}).SerializeToString(deterministic=True)


def encode_example(contract_input: FeatureSpec, input_feature: str, key: str, inputs, label: int) -> bytes:
    """Serializes one example. `inputs` is a NumPy array of the spec's dtype and shape, or a str."""
    if contract_input.encoding == "utf8":
        if not isinstance(inputs, str):
            raise ValueError(f"{key}: text input is {type(inputs).__name__}, not a string")
        value = {"bytes_list": {"value": [inputs.encode("utf-8")]}}
    else:
        array = np.asarray(inputs)
        if tuple(array.shape) != tuple(contract_input.shape):
            raise ValueError(f"{key}: shape {tuple(array.shape)} does not match the contract's "
                             f"{tuple(contract_input.shape)}")
        if contract_input.encoding == "raw_bytes":
            value = {"bytes_list": {"value": [array.astype(contract_input.dtype).tobytes()]}}
        elif contract_input.encoding == "float_list":
            value = {"float_list": {"value": array.astype(np.float32).ravel().tolist()}}
        else:
            raise ValueError(f"unknown encoding {contract_input.encoding!r}")
    return _serialize({KEY_FEATURE: {"bytes_list": {"value": [key.encode("utf-8")]}},
                       LABEL_FEATURE: {"int64_list": {"value": [int(label)]}},
                       input_feature: value})


def encode_language_block(input_feature: str, key: str, tokens) -> bytes:
    """Serializes one language block: `key` and the int64 list `tokens` (no label)."""
    return _serialize({KEY_FEATURE: {"bytes_list": {"value": [key.encode("utf-8")]}},
                       input_feature: {"int64_list": {"value": np.asarray(tokens, np.int64).tolist()}}})


def decode_example(contract_input: FeatureSpec, input_feature: str, serialized: bytes) -> tuple[str, object]:
    """(key, inputs) of one serialized example: a str for text, else a NumPy array of the spec's
    dtype and shape, as kcp/core/examples.py's `parse_examples` gives them."""
    feature = Example.FromString(serialized).features.feature
    key = feature[KEY_FEATURE].bytes_list.value[0].decode("utf-8")
    value = feature[input_feature]
    if contract_input.encoding == "utf8":
        return key, value.bytes_list.value[0].decode("utf-8")
    if contract_input.encoding == "raw_bytes":
        array = np.frombuffer(value.bytes_list.value[0], dtype=contract_input.dtype)
    elif contract_input.encoding == "float_list":
        array = np.asarray(value.float_list.value, np.float32)
    else:
        array = np.asarray(value.int64_list.value, np.int64)
    return key, array.reshape(contract_input.shape)
