"""RUN/data/samples.png: train examples next to their augmented copies (matplotlib, Agg)."""

from __future__ import annotations

import collections
import gzip
import io
import textwrap

import numpy as np
from apache_beam.io.tfrecordio import _TFRecordUtil  # Beam's TFRecord framing (length + CRC32C)

from kcp.core import contract as contract_lib
from kcp.core import example_proto, plots, storage
from kcp.core.layout import RunLayout


def collect_samples(contract, run_dir: str, rows: int = 6, scan: int = 2000) -> list[list[tuple[str, object]]]:
    """Up to `rows` originals from the train shards, each followed by its copies (key, inputs).
    Plain Python, no TensorFlow: preprocessing never imports it."""
    first_shard = contract.split_files(contract_lib.data_dir(run_dir), "train")[0]
    if storage.is_remote(first_shard):  # read through kcp.storage, as every remote file here
        handle = io.BytesIO(storage.read_bytes(first_shard))
    else:
        handle = open(first_shard, "rb")  # noqa: SIM115  closed below
    groups: dict = collections.OrderedDict()
    with handle, (gzip.GzipFile(fileobj=handle) if contract.compression == "gzip" else handle) as records:
        for _ in range(scan):
            serialized = _TFRecordUtil.read_record(records)
            if serialized is None:
                break
            key, value = example_proto.decode_example(contract.input_spec, contract.input_feature, serialized)
            base = key.split("#aug", 1)[0]
            if base in groups or len(groups) < rows:
                groups.setdefault(base, []).append((key, value))
    return [sorted(group, key=lambda item: ("#aug" in item[0], item[0])) for group in groups.values()]


def displayable(image: np.ndarray) -> np.ndarray:
    """An image [H, W, C] of any channel count as matplotlib draws it: 1 channel (or more than 4)
    as gray, its first channel; 2 as gray and alpha (RGBA); 3 and 4 as RGB and RGBA."""
    channels = image.shape[-1]
    if channels == 2:
        return np.concatenate([image[..., :1]] * 3 + [image[..., 1:]], axis=-1)
    if channels in (3, 4):
        return image
    return image[..., 0]


def write_samples(contract, run_dir: str, rows: int = 6) -> str:
    """Draws the grid and writes RUN/data/samples.png; returns its path."""
    with plots.users_text():  # a text example may hold `$`
        return _write_samples(contract, run_dir, rows)


def _write_samples(contract, run_dir: str, rows: int) -> str:
    # a bare Figure, not pyplot: no global figure state and no GUI backend, in any process
    from matplotlib.figure import Figure  # imported only here: about 1 s, for this one figure

    groups = collect_samples(contract, run_dir, rows)
    columns = max((len(group) for group in groups), default=1)
    figure = Figure(figsize=(1.8 * columns + 1, 1.8 * max(1, len(groups))))
    axes = figure.subplots(len(groups) or 1, columns, squeeze=False)
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
                image = displayable(np.asarray(value))
                axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            elif contract.modality == "sequence":
                axis.plot(np.asarray(value).reshape(contract.input_shape[0], -1), linewidth=0.8)
            else:
                axis.text(0.02, 0.5, "\n".join(str(value)[i:i + 28] for i in range(0, min(len(str(value)), 140), 28)),
                          fontsize=6, va="center", family="monospace")
            axis.set_title("original" if "#aug" not in key else key.rsplit("#", 1)[1], fontsize=7)
    copies = " and their augmented copies" if columns > 1 else ""  # one column is too narrow for more
    title = f"{contract.source}: train examples{copies}"  # wrapped to the figure's width: a long path was cut
    figure.suptitle("\n".join(textwrap.wrap(title, int(12 * figure.get_figwidth()), break_on_hyphens=False)), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    path = RunLayout(run_dir).samples
    storage.write_bytes_atomic(path, buffer.getvalue())
    return path
