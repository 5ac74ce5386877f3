"""Preprocessing throughput: the Beam pipeline against a plain single-process loop.

    .venv/bin/python bench/preprocess_throughput.py [--images 50000] [--copies 2] [--workers 2]

Writes N random 32x32x3 PNGs into a temporary image folder, then times
1. `run_preprocess` (folder source, K augmented copies, FnApiRunner multi-processing with
   --workers processes; planning, analysis and the contract included), and
2. a minimal loop doing the same per-example work: read -> decode -> augment K copies of
   the train examples (the same key hash as the pipeline's split) -> serialize -> write one
   TFRecord file (no statistics, no shards, no sorting).
Prints input images per second for both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_images(root: str, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        directory = os.path.join(root, f"class{index % 10}")
        os.makedirs(directory, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(directory, f"{index:06d}.png"))


def plain_loop(root: str, copies: int, output: str) -> int:
    import tensorflow as tf

    from kcp.core.config_load import load_config
    from pipeline.augment import augmented_copies
    from kcp.core.contract import FeatureSpec
    from kcp.core.example_proto import encode_example
    from kcp.core.sources import decode_image_file

    from pipeline.splits import stable_split

    data = load_config([], [f"data.augment.copies={copies}"]).data
    config = data.augment
    spec = FeatureSpec("uint8", (32, 32, 3), "raw_bytes")
    written = 0
    with tf.io.TFRecordWriter(output) as writer:
        for directory in sorted(os.listdir(root)):
            label = int(directory.removeprefix("class"))
            for name in sorted(os.listdir(os.path.join(root, directory))):
                key = f"{directory}/{name}"
                image = decode_image_file(os.path.join(root, directory, name), spec.shape)
                copies = augmented_copies(key, image, "image", config) \
                    if stable_split(key, tuple(data.split), data.seed) == "train" else []  # as the pipeline does
                for copy_key, inputs in [(key, image), *copies]:
                    writer.write(encode_example(spec, "image", copy_key, inputs, label))
                    written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import trainer.models  # noqa: F401  registers the model families, whose keys the config loader validates
    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess

    work = tempfile.mkdtemp(prefix="kcp-bench-")
    root = os.path.join(work, "images")
    started = time.perf_counter()
    make_images(root, args.images)
    print(f"made {args.images} images in {time.perf_counter() - started:.0f} s", flush=True)

    started = time.perf_counter()
    written = plain_loop(root, args.copies, os.path.join(work, "loop.tfrecord"))
    loop_seconds = time.perf_counter() - started
    print(f"loop: {written} records in {loop_seconds:.1f} s", flush=True)

    config = load_config([], [f"data.source=folder:{root}", f"data.augment.copies={args.copies}"])
    started = time.perf_counter()
    contract = run_preprocess(config, os.path.join(work, "run"), [
        "--runner=FnApiRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"])
    pipeline_seconds = time.perf_counter() - started
    records = sum(info.count for info in contract.splits.values())
    print(f"pipeline: {records} records in {pipeline_seconds:.1f} s", flush=True)

    loop_rate, pipeline_rate = args.images / loop_seconds, args.images / pipeline_seconds
    print(f"\n| {args.images:,} 32x32x3 images, {args.copies} copies | input images/s | records/s |")
    print("|---|---|---|")
    print(f"| single-process loop | {loop_rate:,.0f} | {written / loop_seconds:,.0f} |")
    print(f"| Beam pipeline, {args.workers} workers | {pipeline_rate:,.0f} | {records / pipeline_seconds:,.0f} |")
    print(f"| ratio pipeline / loop | {pipeline_rate / loop_rate:.2f} | |")


if __name__ == "__main__":
    main()
