"""Bits per byte of a trained gpt run on each held-out document, beside xz -9 on that document.

    .venv/bin/python bench/lm_per_document.py --run-dir runs/bench-lm --split validation
    .venv/bin/python bench/lm_per_document.py --run-dir runs/bench-lm --split validation --stride 64
    .venv/bin/python bench/lm_per_document.py --run-dir runs/bench-lm --split validation --cache

Where `bench/lm_compression.py` gives one figure per split, this says which documents the model
loses on. For each document of the split (the pipeline's split of `python-stdlib`, as the run was
made): its UTF-8 bytes with the separator, `xz -9` on the document alone, and the model's bits
per byte on it, after a separator, in windows of `data.context_length`. With `--stride S` each
window after the first moves S tokens and scores only its last S targets, so every token but the
first window's sees at least `context - S` tokens of its document (the sliding-window evaluation
of fixed-context models); the default, the context, restarts the context every window as the
trainer's evaluation does. The totals line also gives xz -9 on all documents as one stream (what
`bench/lm_compression.py` prints), which sees the earlier documents too.

With `--cache`, a column more: the model mixed with a document cache (Kuhn and De Mori 1990; for
code, Tu et al. 2014), what xz has and a 256-token context has not: the unigram, bigram and
trigram counts of the document's own earlier tokens, each a next-token distribution, mixed with the
model's by fixed weights (kcp/core/document_cache.py, what the trainer fits and the export's `score`
uses). Here the weights are the grid point with the fewest bits on the *other* held-out split
(test for validation, validation for test and train), so no figure is fitted on the text it
scores; the trainer fits them on validation (metrics.json "document_cache").

Last printed (2026-11-27, the gpt defaults with `data.tokenizer=bpe`, 4 epochs, 2 cores), the
validation split with `--cache` (weights 0.02, 0.2, 0.4 fitted on test); `--stride 64` gave 1.846
for gpt in all (within 0.01 of these on every document):

    document                   bytes    xz -9      gpt   +cache
    _py_abc.py                  6191    2.502    1.464    1.180
    ...
    mailbox.py                 78796    1.284    1.368    0.870
    turtle.py                 144362    1.659    2.335    1.345
    typing.py                 120079    1.844    1.820    1.301
    all (15 documents)        594522    1.791    1.849    1.239   (xz -9 as one stream: 1.626)

The test split, weights fitted on validation (again 0.02, 0.2, 0.4): 13 documents, xz -9 1.983
(as one stream 1.757), gpt 1.670, gpt + cache 1.247, below xz on every document.
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

from kcp.core import document_cache  # noqa: E402  (NumPy only: no TensorFlow at import)


def target_log_probabilities(model, ids: list[int], context: int, stride: int) -> np.ndarray:
    """log P(each target | what precedes it in its window), nats, float64 (len(ids) - 1,): each window
    of `context` inputs scores the targets no earlier window scored."""
    inputs, targets = ids[:-1], ids[1:]
    starts = list(range(0, max(len(inputs) - context, 0) + 1, stride))
    if starts[-1] + context < len(inputs):
        starts.append(len(inputs) - context)
    scores, scored = np.zeros(len(targets)), 0
    for start in starts:
        window = np.asarray([inputs[start:start + context]], np.int32)
        logits = np.asarray(model(window, training=False), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        log_probabilities = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        first = scored - start
        positions = np.arange(first, window.shape[1])
        scores[start + first:start + window.shape[1]] = log_probabilities[
            positions, np.asarray(targets[start + first:start + window.shape[1]])]
        scored = start + window.shape[1]
    assert scored == len(targets)
    return scores


def mixed_bits(model_log_probabilities: np.ndarray, caches: list, weights) -> float:
    """Bits of the targets under the model mixed with the document cache (kcp/core/document_cache.py)."""
    return -float(document_cache.mixed_log_probabilities(model_log_probabilities, caches, weights).sum()) / math.log(2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/bench-lm")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    parser.add_argument("--stride", type=int, default=None, help="tokens between windows; default: the context")
    parser.add_argument("--cache", action="store_true",
                        help="also the model mixed with a document cache, "
                             "its weights fitted on the other held-out split")
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

    def scored(split: str):
        for name, text in split_documents(args.run_dir, split):
            ids = [separator, *contract_lib.encode_language(text, tokenizer, vocabulary), separator]
            caches = document_cache.document_caches(ids) if args.cache else None
            yield name, text, target_log_probabilities(model, ids, context, stride), caches

    weights = None
    if args.cache:
        fit_split = "test" if args.split == "validation" else "validation"
        weights = document_cache.fit_weights([(scores, caches) for _, _, scores, caches in scored(fit_split)])
        print(f"cache weights (unigram, bigram, trigram) fitted on the {fit_split} split: {weights}")
    rows, stream = [], b""
    print(f"{'document':24s} {'bytes':>7s} {'xz -9':>8s} {'gpt':>8s}" + (f" {'+cache':>8s}" if weights else ""))
    for name, text, scores, caches in scored(args.split):
        data = (text + contract_lib.LANGUAGE_SEPARATOR_TEXT).encode("utf-8")
        xz, model_bits = 8 * len(lzma.compress(data, preset=9)), -float(scores.sum()) / math.log(2)
        mixed = mixed_bits(scores, caches, weights) if weights else 0.0
        rows.append((len(data), xz, model_bits, mixed))
        stream += data
        print(f"{name:24s} {len(data):7d} {xz / len(data):8.3f} {model_bits / len(data):8.3f}"
              + (f" {mixed / len(data):8.3f}" if weights else ""), flush=True)
    size = sum(row[0] for row in rows)
    print(f"{f'all ({len(rows)} documents)':24s} {size:7d} {sum(row[1] for row in rows) / size:8.3f} "
          f"{sum(row[2] for row in rows) / size:8.3f}"
          + (f" {sum(row[3] for row in rows) / size:8.3f}" if weights else "")
          + f"   (xz -9 as one stream: {8 * len(lzma.compress(stream, preset=9)) / len(stream):.3f})")


if __name__ == "__main__":
    main()
