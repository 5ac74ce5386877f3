"""Sequence model variants against the defaults, paired by seed, on both sequence sets of
`bench/modality_zoo.py` (local patterns, 6 classes in 48 steps; whole-series waves, 10 classes in
40 steps). Two steps, so the training can run where TensorFlow is not installed (a GPU with JAX):

    .venv/bin/python bench/sequence_variants.py prepare DIR       # here: both sets through `kcp preprocess`
    KERAS_BACKEND=jax python bench/sequence_variants.py train DIR [--seeds 0,1] [--only cnn] [--variants 0,3]
                                                                  [--shard 0/4]

`train` needs only Keras, NumPy and this repository. Each variant is a family and `--set` overrides
of its model keys; a plain `fit` with kcp's defaults (Adam 1e-3, one warmup epoch then cosine,
batch 64, 30 epochs, the last weights, batch-norm momentum from the run's length). One JSON line a
run (test, validation and train accuracy, seconds), also appended to DIR/variants.jsonl. Shards
(`--shard I/N`) split the runs between processes that share one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPLITS = ("train", "validation", "test")
SETS = {"patterns": 6000, "waves": 3000}  # kind: series
VARIANTS = [  # (family, overrides); () is the family's defaults
    ("cnn", ()),
    ("cnn", ("model.filters=[32,64,128]",)),
    ("cnn", ("model.filters=[32,64,128,256]",)),
    ("cnn", ("model.kernel_size=5",)),
    ("cnn", ("model.kernel_size=7",)),
    ("cnn", ("model.filters=[64,128,128]", "model.kernel_size=5")),
    ("resnet", ()),
    ("resnet", ("model.width=32",)),
    ("resnet", ("model.depth=8",)),
    ("resnet", ("model.depth=14",)),
    ("resnet", ("model.dropout=0.3",)),
    ("rnn", ()),
    ("transformer", ()),
    # round 11 (the resnet's defaults are ResNet-8, kernel 5, dropout 0.3 since): round 10's, then wider kernels
    ("resnet", ("model.kernel_size=3", "model.dropout=0.1")),
    ("resnet", ("model.kernel_size=5", "model.dropout=0.1")),
    ("resnet", ("model.kernel_size=5", "model.dropout=0.1", "model.version=2")),
    ("resnet", ("model.kernel_size=7", "model.dropout=0.1")),
]


def prepare(folder: str) -> None:
    import trainer.models  # noqa: F401  registers the families
    from bench.modality_zoo import IN_PROCESS_BEAM, make_sequences, make_waves, split_arrays
    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess

    os.makedirs(folder, exist_ok=True)
    for kind, count in SETS.items():
        make = make_waves if kind == "waves" else make_sequences
        source = make(os.path.join(folder, f"{kind}-source.npz"), count)
        run_dir = os.path.join(folder, f"run-{kind}")
        contract = run_preprocess(load_config([], [f"data.source={source}"]), run_dir, IN_PROCESS_BEAM)
        arrays = {}
        for split in SPLITS:
            values, labels = split_arrays(run_dir, split)
            arrays[f"x_{split}"] = values.reshape((len(values), *contract.input_shape))
            arrays[f"y_{split}"] = labels.astype(np.int32)
        np.savez_compressed(os.path.join(folder, f"{kind}.npz"), **arrays)
        with open(os.path.join(folder, f"{kind}.json"), "w") as handle:
            json.dump({"shape": list(contract.input_shape), "num_classes": contract.num_classes,
                       "mean": contract.statistics["mean"], "std": contract.statistics["std"]}, handle)
        print(kind, {name: array.shape for name, array in arrays.items()})


def train(folder: str, seeds: list[int], only: str, shard: tuple[int, int], picked: str = "") -> None:
    import keras

    from kcp.core.config_load import load_config
    from trainer.models import ModelInputs, build_model
    from trainer.models.common import batch_norm_momentum_for

    variants = [VARIANTS[int(index)] for index in picked.split(",")] if picked else VARIANTS
    runs = [(kind, family, overrides, seed) for seed in seeds for kind in SETS for family, overrides in variants
            if not only or family in only.split(",")]
    index, count = shard
    print(json.dumps({"backend": keras.backend.backend(), "keras": keras.__version__, "runs": len(runs[index::count])}),
          flush=True)
    for kind, family, overrides, seed in runs[index::count]:
        data = np.load(os.path.join(folder, f"{kind}.npz"))
        with open(os.path.join(folder, f"{kind}.json")) as handle:
            info = json.load(handle)
        spec = ModelInputs("sequence", tuple(info["shape"]), info["num_classes"], mean=tuple(info["mean"]),
                           std=tuple(info["std"]), input_name="series")
        steps = -(-len(data["y_train"]) // 64)
        config = load_config([], [f"model.name={family}", *overrides,
                                  f"model.batch_norm_momentum={batch_norm_momentum_for(30 * steps)}"]).model
        keras.utils.set_random_seed(seed)
        model = build_model(spec, config)
        schedule = keras.optimizers.schedules.CosineDecay(0.0, 29 * steps, warmup_target=1e-3, warmup_steps=steps)
        model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])
        started = time.perf_counter()
        model.fit(data["x_train"], data["y_train"], batch_size=64, epochs=30, verbose=0, shuffle=True)
        row = {"set": kind, "family": family, "overrides": list(overrides), "seed": seed,
               "params": model.count_params(), "s": round(time.perf_counter() - started, 1)}
        for split in SPLITS:
            row[split] = round(float(model.evaluate(data[f"x_{split}"], data[f"y_{split}"], verbose=0)[1]), 4)
        print(json.dumps(row), flush=True)
        with open(os.path.join(folder, "variants.jsonl"), "a") as handle:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "train"))
    parser.add_argument("folder")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", default="", help="families, comma-separated (default: all)")
    parser.add_argument("--variants", default="", help="indices into VARIANTS, comma-separated (default: all)")
    parser.add_argument("--shard", default="0/1", help="I/N: this process runs every N-th run from the I-th")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder)
    else:
        index, count = (int(part) for part in args.shard.split("/"))
        train(args.folder, [int(seed) for seed in args.seeds.split(",")], args.only, (index, count), args.variants)


if __name__ == "__main__":
    main()
