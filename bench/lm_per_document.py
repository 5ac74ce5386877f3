"""Bits per byte of a trained gpt run on each held-out document, beside xz -9 on that document.

    .venv/bin/python bench/lm_per_document.py --run-dir runs/bench-lm --split validation
    .venv/bin/python bench/lm_per_document.py --run-dir runs/bench-lm --split validation --stride 64

Where `bench/lm_compression.py` gives one figure per split, this says which documents the model
loses on. For each document of the split (the pipeline's split of `python-stdlib`, as the run was
made): its UTF-8 bytes with the separator, `xz -9` on the document alone, and the model's bits
per byte on it, after a separator, in windows of `data.context_length`. With `--stride S` each
window after the first moves S tokens and scores only its last S targets, so every token but the
first window's sees at least `context - S` tokens of its document (the sliding-window evaluation
of fixed-context models); the default, the context, restarts the context every window as the
trainer's evaluation does. The totals line also gives xz -9 on all documents as one stream (what
`bench/lm_compression.py` prints), which sees the earlier documents too.

Last printed (2026-11-27, the gpt defaults with `data.tokenizer=bpe`, 4 epochs, 2 cores), the
validation split; `--stride 64` gave 1.846 in all (within 0.01 of these on every document):

    document                   bytes    xz -9      gpt
    _py_abc.py                  6191    2.502    1.464
    ...
    mailbox.py                 78796    1.284    1.368
    turtle.py                 144362    1.659    2.335
    typing.py                 120079    1.844    1.820
    all (15 documents)        594522    1.791    1.849   (xz -9 as one stream: 1.626)
"""

from __future__ import annotations

import argparse
import lzma
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm_compression import split_documents  # noqa: E402  (bench/ is this script's own directory)


def nats(model, ids: list[int], context: int, stride: int) -> float:
    """-log P(ids) in nats, each window of `context` inputs scoring the targets no earlier window scored."""
    inputs, targets = ids[:-1], ids[1:]
    starts = list(range(0, max(len(inputs) - context, 0) + 1, stride))
    if starts[-1] + context < len(inputs):
        starts.append(len(inputs) - context)
    total, scored = 0.0, 0
    for start in starts:
        window = np.asarray([inputs[start:start + context]], np.int32)
        logits = np.asarray(model(window, training=False), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        log_probabilities = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        first = scored - start
        positions = np.arange(first, window.shape[1])
        total -= float(log_probabilities[positions, np.asarray(targets[start + first:start + window.shape[1]])].sum())
        scored = start + window.shape[1]
    assert scored == len(targets)
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/bench-lm")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    parser.add_argument("--stride", type=int, default=None, help="tokens between windows; default: the context")
    args = parser.parse_args(argv)

    import keras

    import trainer.models.layers  # noqa: F401  (registers the families and the layers model.keras holds)
    from kcp.core import contract as contract_lib
    from kcp.core.layout import RunLayout

    contract = contract_lib.read_contract(args.run_dir)
    tokenizer = contract_lib.language_tokenizer(contract)
    vocabulary = contract_lib.language_vocabulary(args.run_dir, contract)
    context = int(contract.statistics["context_length"])
    stride = args.stride or context
    model = keras.saving.load_model(RunLayout(args.run_dir).model, compile=False)
    separator = contract_lib.LANGUAGE_SEPARATOR
    rows, stream = [], b""
    print(f"{'document':24s} {'bytes':>7s} {'xz -9':>8s} {'gpt':>8s}")
    for name, text in split_documents(args.run_dir, args.split):
        data = (text + contract_lib.LANGUAGE_SEPARATOR_TEXT).encode("utf-8")
        ids = [separator, *contract_lib.encode_language(text, tokenizer, vocabulary), separator]
        xz, model_bits = 8 * len(lzma.compress(data, preset=9)), nats(model, ids, context, stride) / math.log(2)
        rows.append((len(data), xz, model_bits))
        stream += data
        print(f"{name:24s} {len(data):7d} {xz / len(data):8.3f} {model_bits / len(data):8.3f}", flush=True)
    size = sum(row[0] for row in rows)
    print(f"{f'all ({len(rows)} documents)':24s} {size:7d} {sum(row[1] for row in rows) / size:8.3f} "
          f"{sum(row[2] for row in rows) / size:8.3f}   (xz -9 as one stream: "
          f"{8 * len(lzma.compress(stream, preset=9)) / len(stream):.3f})")


if __name__ == "__main__":
    main()
