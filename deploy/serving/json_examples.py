"""A REST :classify request's JSON examples as serialized tf.train.Examples, by TF Serving's rules."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from deploy.serving.codec import RequestError, decode_value


def _feature(name: str, value, where: str) -> tf.train.Feature:
    """One JSON feature value as TF Serving's REST API makes it a tf.train.Feature: strings and
    {"b64": ...} -> bytes_list; integers (and booleans) -> int64_list; numbers with any float among
    them -> float_list; a list of them is one feature (nested numeric lists are flattened)."""
    flat, pending = [], [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        else:
            flat.append(item)
    if not flat:
        return tf.train.Feature()  # no kind, as TF Serving makes an empty list
    if all(isinstance(v, (bytes, str)) for v in flat):
        return tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[v.encode("utf-8") if isinstance(v, str) else v for v in flat]))
    odd = [v for v in flat if not isinstance(v, (int, float))]
    if odd:
        odd = odd[0]
        held = ("strings and numbers" if isinstance(odd, (bytes, str)) else
                "a JSON null" if odd is None else "a JSON object")
        raise RequestError(f"{where}: feature {name!r} holds {held}; a feature is a number, a string, "
                           "{\"b64\": ...}, or a list of one kind of them")
    if all(isinstance(v, int) for v in flat):
        if any(not -2**63 <= v < 2**63 for v in flat):
            raise RequestError(f"{where}: feature {name!r} holds an integer beyond int64's range")
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in flat]))
    array = np.asarray(flat, np.float64)
    if not np.all(np.isfinite(array)):
        raise RequestError(f"{where}: feature {name!r} holds NaN or infinite values")
    if np.any(np.abs(array) > np.finfo(np.float32).max):
        raise RequestError(f"{where}: feature {name!r} holds a value beyond float32's range")
    return tf.train.Feature(float_list=tf.train.FloatList(value=array.tolist()))


def json_examples(examples: list, context: dict | None = None) -> list[bytes]:
    """A REST :classify request's `examples` (JSON objects of features) as serialized
    tf.train.Examples, by TF Serving's JSON rules (`_feature`), each merged with the `context`'s
    features (an example's own feature wins, as when TF Serving merges the context proto)."""
    serialized = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict):
            raise RequestError(f"example {index} must be a JSON object of features")
        merged = {**(context or {}), **example}
        features = {name: _feature(name, decode_value(value), f"example {index}") for name, value in merged.items()}
        serialized.append(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    return serialized
