"""RUN/data/samples.png: train examples next to their augmented copies (matplotlib, Agg)."""

from __future__ import annotations

import collections
import io
import tempfile

import numpy as np
import tensorflow as tf

from kcp.core import storage
from kcp.core import contract as contract_lib
from kcp.core import examples as example_lib
from kcp.core.layout import RunLayout


def collect_samples(contract, run_dir: str, rows: int = 6, scan: int = 2000) -> list[list[tuple[str, object]]]:
    """Up to `rows` originals from the train shards, each followed by its copies (key, inputs)."""
    first_shard = contract.split_files(contract_lib.data_dir(run_dir), "train")[0]
    with tempfile.TemporaryDirectory() as local:
        if storage.is_remote(first_shard):  # read through kcp.storage, as every remote file here
            path = storage.join(local, "shard")
            with open(path, "wb") as handle:
                handle.write(storage.read_bytes(first_shard))
        else:
            path = first_shard
        compression = "GZIP" if contract.compression == "gzip" else ""
        groups: dict = collections.OrderedDict()
        records = tf.data.TFRecordDataset(path, compression_type=compression).take(scan).batch(256)
        for serialized in records:
            inputs, _, keys = example_lib.parse_examples(contract, serialized)
            for value, key in zip(inputs.numpy(), keys.numpy()):
                key = key.decode("utf-8")
                base = key.split("#aug", 1)[0]
                if base in groups or len(groups) < rows:
                    groups.setdefault(base, []).append((key, value.decode("utf-8") if isinstance(value, bytes) else value))
    return [sorted(group, key=lambda item: ("#aug" in item[0], item[0])) for group in groups.values()]


def write_samples(contract, run_dir: str, rows: int = 6) -> str:
    """Draws the grid and writes RUN/data/samples.png; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = collect_samples(contract, run_dir, rows)
    columns = max((len(group) for group in groups), default=1)
    figure, axes = plt.subplots(len(groups) or 1, columns, figsize=(1.8 * columns + 1, 1.8 * max(1, len(groups))),
                                squeeze=False)
    for row, group in enumerate(groups):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(group):
                axis.axis("off")
                continue
            key, value = group[column]
            if contract.modality == "image":
                image = np.asarray(value)
                axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                            vmin=0, vmax=255)
            elif contract.modality == "sequence":
                axis.plot(np.asarray(value).reshape(contract.input_shape[0], -1), linewidth=0.8)
            else:
                axis.text(0.02, 0.5, "\n".join(str(value)[i:i + 28] for i in range(0, min(len(str(value)), 140), 28)),
                          fontsize=6, va="center", family="monospace")
            axis.set_title("original" if "#aug" not in key else key.rsplit("#", 1)[1], fontsize=7)
    figure.suptitle(f"{contract.source}: train examples and augmented copies", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    path = RunLayout(run_dir).samples
    storage.write_bytes_atomic(path, buffer.getvalue())
    return path
