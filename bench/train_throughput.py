"""Trainer throughput: `kcp train` against a bare model.fit, and the input pipeline alone.

    .venv/bin/python bench/train_throughput.py [--images 6000] [--model cnn] [--epochs 4]

Writes N random 32x32x3 images with 10 labels as an .npz, preprocesses it (the npz source),
then measures in examples/s, first epoch excluded:
1. the trainer (`trainer.train.train`, the same code as `kcp train`) on the TFRecord shards;
2. a bare `model.fit` of the same model on the same images held in memory as NumPy arrays;
3. the trainer's tf.data pipeline alone (no model), two passes.
Prints the ratios the trainer issue aims at: trainer / bare >= 0.95, input / model >= 5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    import keras
    import numpy as np

    from kcp.core.config_load import load_config
    from kcp.core import contract as contract_lib
    from kcp.core import examples as example_lib
    from pipeline.preprocess import run_preprocess
    from trainer.callbacks import ThroughputTimer, examples_per_second
    from trainer.data import make_dataset
    from trainer.models import ModelInputs, build_model
    from trainer.train import train

    work = tempfile.mkdtemp(prefix="kcp-train-bench-")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=args.images)
    np.savez(os.path.join(work, "data.npz"), x_train=x, y_train=y, x_test=x[:500], y_test=y[:500])
    run_dir = os.path.join(work, "run")
    overrides = [f"model.name={args.model}", f"train.epochs={args.epochs}", "train.batch_size=128",
                 "train.schedule=constant", "data.split=[0.9, 0.1, 0.0]"]
    config = load_config([], [f"data.source=npz:{os.path.join(work, 'data.npz')}", *overrides])
    contract = run_preprocess(config, run_dir, ["--runner=FnApiRunner", "--direct_running_mode=in_memory"])
    train_count = contract.splits["train"].count

    metrics = train(config, run_dir)
    trainer_rate = metrics["examples_per_second"]

    # the same model and train examples, in memory, bare model.fit
    inputs, labels = [], []
    for batch, batch_labels, _ in example_lib.read_split(contract, contract_lib.data_dir(run_dir), "train", 512):
        inputs.append(batch.numpy().astype("float32"))
        labels.append(batch_labels.numpy())
    x_train, y_train = np.concatenate(inputs), np.concatenate(labels)
    keras.utils.set_random_seed(0)
    model = build_model(ModelInputs.from_contract(contract), config.model)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = ThroughputTimer()
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs, verbose=0, callbacks=[timer])
    bare_rate = examples_per_second(len(x_train), timer.epoch_seconds)

    dataset = make_dataset(contract, contract_lib.data_dir(run_dir), "train", config.train, global_batch=128,
                           training=True)
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in dataset:
            pass
        seconds.append(time.perf_counter() - started)
    input_rate = examples_per_second(train_count, seconds)

    print(f"\n| {args.model}, {train_count:,} train images 32x32x3, batch 128 | examples/s |")
    print("|---|---|")
    print(f"| kcp train (TFRecords, tf.data) | {trainer_rate:,.0f} |")
    print(f"| bare model.fit on NumPy arrays | {bare_rate:,.0f} |")
    print(f"| input pipeline alone | {input_rate:,.0f} |")
    print(f"\ntrainer / bare: {trainer_rate / bare_rate:.2f} (aim >= 0.95); "
          f"input / model: {input_rate / trainer_rate:.1f}x (aim >= 5)")


if __name__ == "__main__":
    main()
