"""The `tfds:NAME[:SPLIT]` source: a prepared TensorFlow Datasets builder under data.tfds_data_dir."""

from __future__ import annotations

import os

import numpy as np

from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.sources.base import SourceError, SourcePlan, SourceRecord, class_names_of

# TFDS split names -> ours, for builders read whole (no SPLIT in the URI)
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "test": "test"}


def plan_tfds(uri: str, spec_text: str, data: DataConfig):
    import tensorflow_datasets as tfds  # an optional extra, slow to import; only this source needs it

    name, _, split_name = spec_text.partition(":")
    data_dir = data.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001  tfds raises many types for unknown names
        raise SourceError(f"data.source: {name!r} is not a TensorFlow Datasets builder ({error})") from None
    if not builder.is_prepared():
        raise SourceError(f"data.source: tfds {name!r} is not prepared in {data_dir}; prepare it with "
                          f"`tfds build {name} --data_dir {data_dir}` (or `python -c \"import tensorflow_datasets "
                          f"as tfds; tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"`)")
    keys = builder.info.supervised_keys
    if not keys or len(keys) < 2:
        raise SourceError(f"data.source: tfds {name!r} has no supervised (input, label) keys")
    input_key, label_key = keys[0], keys[1]
    features = builder.info.features
    label_feature = features[label_key]
    names = list(getattr(label_feature, "names", []) or [])
    available = list(builder.info.splits.keys())
    wanted = [split_name] if split_name else available
    if not wanted:
        raise SourceError(f"data.source: tfds {name!r} lists no splits; name one, e.g. tfds:{name}:train")
    records = []
    for tfds_split in wanted:
        if available and tfds_split not in available:
            raise SourceError(f"data.source: tfds {name!r} has no split {tfds_split!r} ({', '.join(available)})")
        ours = SPLIT_NAMES.get(tfds_split) if not split_name else None
        for index, example in enumerate(tfds.as_numpy(builder.as_dataset(split=tfds_split))):
            value, label = example[input_key], example[label_key]
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            label = names[int(label)] if names else str(label.item() if hasattr(label, "item") else label)
            records.append(SourceRecord(f"{tfds_split}/{index:08d}", value, label, ours))
    if not records:
        raise SourceError(f"data.source: tfds {name!r} split {split_name or 'all'} is empty")
    has_splits = any(r.split for r in records)
    if isinstance(records[0].payload, str):
        spec, modality = FeatureSpec("string", (), "utf8"), "text"
    else:
        shape = tuple(np.asarray(records[0].payload).shape)
        if len(shape) != 3:
            raise SourceError(f"data.source: tfds {name!r} input {input_key!r} has shape {list(shape)}; "
                              "expected an image [H, W, C] or text")
        spec, modality = FeatureSpec("uint8", shape, "raw_bytes"), "image"
    class_names = tuple(names) if names else class_names_of(r.label for r in records)
    return SourcePlan(uri, "tfds", modality, modality, spec, class_names, has_splits), records
