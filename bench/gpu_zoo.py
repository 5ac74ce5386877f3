"""The model zoo under the JAX backend: digits accuracy per family, and training throughput.

Runs without TensorFlow or Beam (the GPU machine has neither), on whatever JAX finds:

    KERAS_BACKEND=jax .venv/bin/python bench/gpu_zoo.py --out bench/results/gpu_zoo.md [--quick]

Digits are split exactly as the pipeline splits them (pipeline.splits) and normalised with
the train split's statistics, and each family is trained with its default config, the
trainer's optimizer and schedule. Throughput is `model.fit` on in-memory synthetic data at
the shapes of the README's CPU figures (ResNet-20 on 32x32x3; a 2-layer d=64 Transformer
and an LSTM(128) on 128 tokens), first epoch (compilation) excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digits_arrays():
    import numpy as np
    from sklearn.datasets import load_digits

    from kcp.core.sources import digits_to_uint8
    from pipeline.splits import stable_split

    digits = load_digits()
    images = digits_to_uint8(digits.images).astype("float32")
    assigned = np.array([stable_split(f"digits/{i:04d}", (0.8, 0.1, 0.1), 42) for i in range(len(images))])
    return {split: (images[assigned == split], digits.target[assigned == split]) for split in ("train", "validation", "test")}


def train_digits(family: str, epochs: int) -> dict:
    import keras

    from kcp.core.config_load import load_config
    from trainer.callbacks import ThroughputTimer, examples_per_second, learning_rate, steps_per_epoch
    from trainer.models import ModelInputs, build_model
    from trainer.objectives import make_optimizer

    data = digits_arrays()
    x_train, y_train = data["train"]
    spec = ModelInputs("image", (8, 8, 1), 10, mean=(float(x_train.mean()),), std=(float(x_train.std()),))
    config = load_config([], [f"model.name={family}", f"train.epochs={epochs}"])
    keras.utils.set_random_seed(config.train.seed)
    model = build_model(spec, config.model)
    steps = steps_per_epoch(len(x_train), config.train.batch_size, False)
    model.compile(make_optimizer(config.train, learning_rate(config.train, steps)), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    timer = ThroughputTimer()
    started = time.perf_counter()
    model.fit(x_train, y_train, batch_size=config.train.batch_size, epochs=epochs, verbose=0,
              validation_data=data["validation"], callbacks=[timer])
    _, accuracy = model.evaluate(*data["test"], verbose=0)
    return {"family": family, "test_accuracy": float(accuracy), "epochs": epochs,
            "examples_per_second": examples_per_second(len(x_train), timer.epoch_seconds),
            "wall_seconds": time.perf_counter() - started}


def throughput(name: str, family: str, spec_args: dict, overrides: list, batch: int, steps: int, epochs: int) -> dict:
    import keras
    import numpy as np

    from kcp.core.config_load import load_config
    from trainer.callbacks import ThroughputTimer, examples_per_second
    from trainer.models import ModelInputs, build_model

    spec = ModelInputs(**spec_args)
    model = build_model(spec, load_config([], [f"model.name={family}", *overrides]).model)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    count = batch * steps
    if spec.modality == "text":
        x = rng.integers(2, spec.vocab_size, size=(count, *spec.shape)).astype("int32")
    else:
        x = rng.normal(size=(count, *spec.shape)).astype("float32")
    y = rng.integers(0, spec.num_classes, size=count)
    timer = ThroughputTimer()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[timer], shuffle=False)
    return {"benchmark": name, "batch": batch, "examples_per_second": examples_per_second(count, timer.epoch_seconds),
            "params": model.count_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/gpu_zoo.md")
    parser.add_argument("--quick", action="store_true", help="2 epochs and small steps: a smoke run")
    args = parser.parse_args()

    import jax
    import keras

    epochs = 2 if args.quick else 30
    steps = 3 if args.quick else 40
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    rows = [train_digits(family, epochs) for family in ("cnn", "resnet", "rnn", "transformer")]
    for row in rows:
        print(json.dumps(row), flush=True)
    benches = [
        ("ResNet-20, 32x32x3", "resnet", dict(modality="image", shape=(32, 32, 3), num_classes=10), ["model.depth=20"]),
        ("Transformer 2x d=64, 128 tokens", "transformer",
         dict(modality="text", shape=(128,), num_classes=2, vocab_size=20000, input_name="text"),
         ["model.layers=2", "model.dim=64", "model.heads=4", "model.mlp_dim=128"]),
        ("LSTM(128), 128 tokens", "rnn", dict(modality="text", shape=(128,), num_classes=2, vocab_size=20000,
                                             input_name="text"), ["model.layers=1", "model.units=128"]),
    ]
    speeds = []
    for name, family, spec_args, overrides in benches:
        for batch in (128, 1024):
            result = throughput(name, family, spec_args, overrides, batch, steps, 2 if args.quick else 3)
            speeds.append(result)
            print(json.dumps(result), flush=True)
    lines = [f"# Model zoo under JAX on {device}", "",
             f"keras {keras.__version__}, jax {jax.__version__}, python {platform.python_version()}", "",
             "| model (digits, defaults) | test accuracy | epochs | train examples/s | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['test_accuracy']:.4f} | {r['epochs']} | {r['examples_per_second']:,.0f} | "
              f"{r['wall_seconds']:.0f} |" for r in rows]
    lines += ["", "| throughput (model.fit, synthetic) | batch | examples/s |", "|---|---|---|"]
    lines += [f"| {s['benchmark']} | {s['batch']} | {s['examples_per_second']:,.0f} |" for s in speeds]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("tensorflow imported:", "tensorflow" in sys.modules)


if __name__ == "__main__":
    main()
