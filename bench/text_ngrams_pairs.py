"""Every text family with and without the character n-gram bag, paired by seed, on the text lines of
`bench/modality_zoo.py` (docs/performance.md round 9). Two steps, so the training can run where
TensorFlow is not installed (a GPU machine with JAX):

    .venv/bin/python bench/text_ngrams_pairs.py prepare DIR     # here: the lines, `kcp preprocess`, and the
                                                                # model inputs the real vectorizer makes
    KERAS_BACKEND=jax python bench/text_ngrams_pairs.py train DIR [--seeds 0,1]

`train` needs only Keras, NumPy and this repository: a plain `fit` with kcp's defaults (Adam 1e-3, one
warmup epoch then cosine, batch 64, 30 epochs, the last weights), and prints one JSON line a run
(test and validation accuracy, seconds), also written to DIR/pairs.json.
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
FAMILIES = ("cnn", "resnet", "rnn", "transformer")


def prepare(folder: str, per_class: int) -> None:
    import tensorflow as tf

    import trainer.models  # noqa: F401  registers the families
    from bench.modality_zoo import IN_PROCESS_BEAM, make_text, split_arrays
    from kcp.core import examples as example_lib
    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess
    from trainer.models import ModelInputs

    os.makedirs(folder, exist_ok=True)
    run_dir = os.path.join(folder, "run")
    source = make_text(os.path.join(folder, "lines.jsonl"), per_class)
    contract = run_preprocess(load_config([], [f"data.source={source}"]), run_dir, IN_PROCESS_BEAM)
    vectorizer = example_lib.text_vectorizer(contract, run_dir)
    arrays = {}
    for split in SPLITS:
        texts, labels = split_arrays(run_dir, split)
        arrays[f"x_{split}"] = np.asarray(vectorizer(tf.constant(texts))).astype(np.int32)
        arrays[f"y_{split}"] = labels.astype(np.int32)
    np.savez_compressed(os.path.join(folder, "text.npz"), **arrays)
    spec = ModelInputs.from_contract(contract)
    with open(os.path.join(folder, "spec.json"), "w") as handle:
        json.dump({"max_length": spec.shape[0], "char_ngram_length": spec.char_ngram_length,
                   "buckets": spec.char_ngram_buckets, "vocab_size": spec.vocab_size,
                   "num_classes": spec.num_classes}, handle)
    print({name: array.shape for name, array in arrays.items()})


def train(folder: str, seeds: list[int]) -> None:
    import keras

    from kcp.core.config_load import load_config
    from trainer.models import ModelInputs, build_model

    data = np.load(os.path.join(folder, "text.npz"))
    with open(os.path.join(folder, "spec.json")) as handle:
        info = json.load(handle)
    tokens, grams_length = info["max_length"], info["char_ngram_length"]
    print(json.dumps({"backend": keras.backend.backend(), "keras": keras.__version__}), flush=True)
    results = []
    for seed in seeds:
        for family in FAMILIES:
            for grams in (True, False):
                spec = ModelInputs("text", (tokens,), info["num_classes"], vocab_size=info["vocab_size"],
                                   input_name="text", char_ngram_length=grams_length if grams else 0,
                                   char_ngram_buckets=info["buckets"] if grams else 0)
                inputs = {split: data[f"x_{split}"][:, :spec.input_shape[0]] for split in SPLITS}
                keras.utils.set_random_seed(seed)
                model = build_model(spec, load_config([], [f"model.name={family}"]).model)
                steps = -(-len(inputs["train"]) // 64)
                schedule = keras.optimizers.schedules.CosineDecay(0.0, 29 * steps, warmup_target=1e-3,
                                                                  warmup_steps=steps)
                model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy",
                              metrics=["accuracy"])
                started = time.perf_counter()
                model.fit(inputs["train"], data["y_train"], batch_size=64, epochs=30, verbose=0, shuffle=True)
                row = {"seed": seed, "family": family, "grams": grams, "s": round(time.perf_counter() - started, 1)}
                for split in ("validation", "test"):
                    row[split] = round(float(model.evaluate(inputs[split], data[f"y_{split}"], verbose=0)[1]), 4)
                results.append(row)
                print(json.dumps(row), flush=True)
                with open(os.path.join(folder, "pairs.json"), "w") as handle:
                    json.dump(results, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "train"))
    parser.add_argument("folder")
    parser.add_argument("--text-per-class", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder, args.text_per_class)
    else:
        train(args.folder, [int(seed) for seed in args.seeds.split(",")])


if __name__ == "__main__":
    main()
