"""Held-out bits per byte of the gpt family on the default corpus, beside gzip -9 and xz -9.

    .venv/bin/python bench/lm_compression.py --set data.tokenizer=bpe   # the gpt defaults: 4 epochs, ~27 min
    .venv/bin/python bench/lm_compression.py --epochs 2 --set model.dim=192

A compressor is the floor any language model must beat: `xz -9` on the held-out text is what
a general-purpose model of bytes achieves with no training at all. This runs `kcp preprocess`
and `kcp train` for `--model gpt` on `python-stdlib` (the top-level standard-library modules
of this Python, split by the hash of each file name), then writes side by side:

    gzip -9 and xz -9: 8 x compressed size / size of the test split's documents, compressed
                       as one stream (the separators between documents included, as the model
                       sees them), so the compressors see their whole history; the model
                       restarts its context every `data.context_length` tokens
    gpt:               the trainer's test bits per byte (RUN/train/metrics.json): nats per
                       target token x target tokens / target bytes / ln 2
    gpt, whole documents, gpt + document cache: the trainer's metrics.json "document_cache":
                       each test document scored whole, as the export's `score` scores a
                       text, by the network alone and mixed with the document cache whose
                       weights the trainer fitted on the validation split

Wall times of each stage are printed too; the aim is a model below xz -9 within a 30-minute
run on 2 CPU cores. Last printed (2026-11-27, 2 cores, `--set data.tokenizer=bpe`, the gpt
defaults: batch 8, 4 epochs; train includes the document cache's fit, about 30 s):

    corpus   python-stdlib, 4,698,388 bytes; test split 367,398 bytes in 13 documents (367,424 bytes ...)
    model    gpt, 4,273,664 parameters, context 256, 4 epoch(s), 3,067 tokens/s
    wall     preprocess 14 s, train 1647 s, total 1662 s
    held-out bits per byte (lower is better):
      gzip -9                2.005
      xz -9                  1.757
      gpt                    1.669
      gpt, whole documents   1.669
      gpt + document cache   1.246
    validation split (the cache's weights [0.02, 0.2, 0.4] were fitted on it): xz -9 1.626, gpt 1.846, ...
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def split_documents(run_dir: str, split: str) -> list[tuple[str, str]]:
    """(name, text) of the `split` documents of the run's python-stdlib corpus, in key order."""
    import trainer.models  # noqa: F401  (registers the families the run's config.yaml names)
    from kcp.core.config_load import resolve_config
    from kcp.core.sources.corpus import decode_document, stdlib_files, stdlib_root
    from pipeline.splits import stable_split

    data = resolve_config(run_dir).data  # the split fractions and seed the run was made with
    root = stdlib_root()
    names = [name for name, _ in stdlib_files()][:data.limit or None]
    return [(name, decode_document(os.path.join(root, name))) for name in names
            if stable_split(name, tuple(data.split), data.seed) == split]


def held_out_text(run_dir: str, split: str = "test") -> bytes:
    """The `split` documents of the run, in key order, each followed by the separator text, as UTF-8."""
    from kcp.core import contract as contract_lib

    documents = split_documents(run_dir, split)
    return "".join(text + contract_lib.LANGUAGE_SEPARATOR_TEXT for _, text in documents).encode("utf-8")


def compressor_bits_per_byte(data: bytes) -> dict:
    return {"gzip -9": 8 * len(gzip.compress(data, compresslevel=9)) / len(data),
            "xz -9": 8 * len(lzma.compress(data, preset=9)) / len(data)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/bench-lm")
    parser.add_argument("--epochs", type=int, default=None, help="default: the gpt family's train.epochs")
    parser.add_argument("--set", action="append", default=[], help="more config overrides, as `kcp --set`")
    args = parser.parse_args(argv)

    import kcp

    started = time.perf_counter()
    contract = kcp.preprocess(args.run_dir, model="gpt", overrides=args.set)
    preprocessed = time.perf_counter()
    epochs = [f"train.epochs={args.epochs}"] if args.epochs else []
    result = kcp.train(args.run_dir, "gpt", overrides=[*epochs, *args.set])
    trained = time.perf_counter()

    data = held_out_text(args.run_dir)
    rows = compressor_bits_per_byte(data)
    metrics = result.metrics
    rows["gpt"] = metrics["test"]["bits_per_byte"]
    cache = metrics.get("document_cache", {})
    if "test" in cache:  # whole documents, as the export's `score` scores them
        rows["gpt, whole documents"] = cache["test"]["network_bits_per_byte"]
        rows["gpt + document cache"] = cache["test"]["bits_per_byte"]
    statistics = contract.statistics
    print(f"corpus   python-stdlib, {sum(statistics['bytes'].values()):,} bytes; test split "
          f"{statistics['bytes']['test']:,} bytes in {statistics['documents']['test']} documents "
          f"({len(data):,} bytes with separators, as compressed)")
    print(f"model    gpt, {metrics['params']:,} parameters, context {statistics['context_length']}, "
          f"{metrics['epochs']} epoch(s), {metrics.get('tokens_per_second', 0):,.0f} tokens/s")
    print(f"wall     preprocess {preprocessed - started:.0f} s, train {trained - preprocessed:.0f} s, "
          f"total {trained - started:.0f} s")
    print("held-out bits per byte (lower is better):")
    for name, value in rows.items():
        print(f"  {name:22s} {value:.3f}")
    if "validation" in cache:
        validation = compressor_bits_per_byte(held_out_text(args.run_dir, "validation"))
        print(f"validation split (the cache's weights {cache['weights']} were fitted on it): xz -9 "
              f"{validation['xz -9']:.3f}, gpt {cache['validation']['network_bits_per_byte']:.3f}, "
              f"gpt + document cache {cache['validation']['bits_per_byte']:.3f}")
    print(json.dumps({"bits_per_byte": rows, "train_seconds": trained - preprocessed}))


if __name__ == "__main__":
    main()
