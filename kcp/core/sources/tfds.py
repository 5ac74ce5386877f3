"""The `tfds:NAME[:SPLIT]` source: a prepared TensorFlow Datasets builder under data.tfds_data_dir.

The driver opens the builder's metadata and reads one example (the input's shape or text);
the workers read the split in ranges of TASK_ROWS examples (`SPLIT[a:b]`, which TFDS maps to
the files holding them), each worker its own range.
"""

from __future__ import annotations

import os

import numpy as np

from kcp.core.config import DataConfig
from kcp.core.contract import FeatureSpec
from kcp.core.layout import SPLIT_NAMES  # TFDS split names -> ours, for builders read whole (no SPLIT in the URI)
from kcp.core.sources.base import SourceError, SourcePlan, SourceRecord, ranges

TASK_ROWS = 100_000


def _builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds  # an optional extra, slow to import; only this source needs it

    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001  tfds raises many types for unknown names
        raise SourceError(f"data.source: {name!r} is not a TensorFlow Datasets builder ({error})") from None


def _label_of(label, names) -> str:
    return names[int(label)] if names else str(label.item() if hasattr(label, "item") else label)


def plan_tfds(uri: str, spec_text: str, data: DataConfig):
    import tensorflow_datasets as tfds

    name, _, split_name = spec_text.partition(":")
    data_dir = data.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
        raise SourceError(f"data.source: tfds {name!r} is not prepared in {data_dir}; prepare it with "
                          f"`tfds build {name} --data_dir {data_dir}` (or `python -c \"import tensorflow_datasets "
                          f"as tfds; tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"`)")
    keys = builder.info.supervised_keys
    if not keys or len(keys) < 2:
        raise SourceError(f"data.source: tfds {name!r} has no supervised (input, label) keys")
    input_key, label_key = keys[0], keys[1]
    names = list(getattr(builder.info.features[label_key], "names", []) or [])
    available = list(builder.info.splits.keys())
    wanted = [split_name] if split_name else available
    if not wanted:
        raise SourceError(f"data.source: tfds {name!r} lists no splits; name one, e.g. tfds:{name}:train")
    tasks, left = [], data.limit
    for tfds_split in wanted:
        if available and tfds_split not in available:
            raise SourceError(f"data.source: tfds {name!r} has no split {tfds_split!r} ({', '.join(available)})")
        ours = SPLIT_NAMES.get(tfds_split) if not split_name else None
        total = int(builder.info.splits[tfds_split].num_examples) if tfds_split in available else 0
        if data.limit:
            if left <= 0:
                break
            total = min(total, left) if total else left
            left -= total
        if total > TASK_ROWS:
            tasks += [("tfds", tfds_split, ours, start, stop) for start, stop in ranges(total, TASK_ROWS)]
        else:
            tasks.append(("tfds", tfds_split, ours, 0, total or None))  # unknown size or small: one task
    first = next(iter(tfds.as_numpy(builder.as_dataset(split=wanted[0]).take(1))), None)
    if first is None:
        raise SourceError(f"data.source: tfds {name!r} split {split_name or wanted[0]} is empty")
    value = first[input_key]
    if isinstance(value, (bytes, str)):
        spec, modality = FeatureSpec("string", (), "utf8"), "text"
    else:
        shape = tuple(np.asarray(value).shape)
        if len(shape) != 3:
            raise SourceError(f"data.source: tfds {name!r} input {input_key!r} has shape {list(shape)}; "
                              "expected an image [H, W, C] or text")
        if shape[2] not in (1, 3):  # the export decodes image bytes to gray or RGB, as with npz
            raise SourceError(f"data.source: tfds {name!r} input {input_key!r} has {shape[2]} channels; images "
                              "have 1 (grayscale) or 3 (RGB)")
        spec, modality = FeatureSpec("uint8", shape, "raw_bytes"), "image"
    has_splits = any(task[2] for task in tasks)
    options = {"name": name, "data_dir": data_dir, "input": input_key, "label": label_key, "names": names}
    count = sum((task[4] or 0) - task[3] for task in tasks)
    return SourcePlan(uri, "tfds", modality, modality, spec, tuple(names), has_splits, tuple(tasks), count, options)


def read_tfds_task(plan: SourcePlan, task):
    import tensorflow_datasets as tfds

    _, tfds_split, ours, start, stop = task
    options = plan.options
    builder = _builder(options["name"], options["data_dir"])
    split = tfds_split if stop is None or (start == 0 and stop == builder.info.splits[tfds_split].num_examples) \
        else f"{tfds_split}[{start}:{stop}]"
    dataset = builder.as_dataset(split=split)
    if stop is not None and split == tfds_split:
        dataset = dataset.take(stop)
    for index, example in enumerate(tfds.as_numpy(dataset), start=start):
        value = example[options["input"]]
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        yield SourceRecord(f"{tfds_split}/{index:08d}", value, _label_of(example[options["label"]], options["names"]),
                           ours)
