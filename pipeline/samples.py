"""RUN/data/samples.png: train examples next to their augmented copies (matplotlib, Agg)."""

from __future__ import annotations

import collections
import io

import numpy as np

from kcp import storage
from pipeline import contract as contract_lib


def collect_samples(contract, run_dir: str, rows: int = 6, scan: int = 2000) -> list[list[tuple[str, object]]]:
    """Up to `rows` originals from the train shards, each followed by its copies (key, inputs)."""
    groups: dict = collections.OrderedDict()
    seen = 0
    for inputs, _, keys in contract_lib.read_split(contract, contract_lib.data_dir(run_dir), "train", 256):
        for value, key in zip(inputs.numpy(), keys.numpy()):
            key = key.decode("utf-8")
            base = key.split("#aug", 1)[0]
            if base in groups or len(groups) < rows:
                groups.setdefault(base, []).append((key, value.decode("utf-8") if isinstance(value, bytes) else value))
            seen += 1
        if seen >= scan:
            break
    return [sorted(group, key=lambda item: (item[0] != base, item[0])) for base, group in groups.items()]


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
    path = storage.join(contract_lib.data_dir(run_dir), "samples.png")
    if storage.is_remote(path):
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "wb") as handle:
            handle.write(buffer.getvalue())
    else:
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue())
    return path
