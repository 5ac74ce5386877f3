"""Test accuracy and wall time of every model family with its defaults on each modality, next to
scikit-learn baselines (logistic regression, an SVM) on the same split.

    .venv/bin/python bench/modality_zoo.py [--modalities image,colour,sequence,text]
                                           [--families cnn,resnet,rnn,transformer] (--families '': baselines only)
                                           [--set KEY=VALUE ...] [--out FILE.md]

Four data sets, made here, each preprocessed once like `kcp preprocess` (the same split
`kcp run` uses), then each family trained as `kcp train --model NAME` would:

- image: the embedded digits (8x8x1, 10 classes, 1,797 images).
- colour: 3,000 32x32 colour PNGs in 10 class folders (`--glyph-count`), `folder:` as a user's
  images: a digit drawn 3x larger at a random place, random foreground and background colours,
  pixel noise, and 5 corrupt files (they go to the dead-letter file).
- sequence: 1,800 generated series (`--sequence-count`) of 48 steps, 6 classes, each a short pattern (bump, dip,
  step up, step down, double bump, spike) at a random position, scaled by 0.5..2 and buried in
  noise: the class is the pattern's shape, wherever it sits, so a model must be position-invariant.
  `--sequence-kind waves`: a second set of another kind, 40 steps and 10 classes of whole-series shape
  (sine, square, triangle, two saws, two chirps, a bump, a damped sine, a step) at a random period,
  phase, scale and offset, in noise.
- text: 2,400 lines (6 classes of 400; `--text-per-class`) read from the files installed on this machine: Python
  (.py), C headers (.h), JSON, plain text (.txt), Markdown/reST and JavaScript/CSS, including
  the lines that are only punctuation (`}`, `);`, `---`), with the default `words_and_punctuation`
  tokenizer (`--set data.tokenizer=words` or `characters` for the others) and the character 1-4-grams
  beside the tokens (`--set data.char_ngrams=0` for the tokens alone).

The baselines are scikit-learn's LogisticRegression and SVC (RBF kernel) on the standardized raw
values (images, sequences), LogisticRegression on word and on character 1-4-gram TF-IDF and a
LinearSVC on the latter (text), fitted on the train split, scored on test.
Wall time is `train()`'s own, on whatever cores the machine has (2 for docs/performance.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IN_PROCESS_BEAM = ["--runner=FnApiRunner", "--direct_running_mode=in_memory"]
TEXT_KINDS = {"python": ("py",), "c_header": ("h",), "json": ("json",), "text": ("txt",),
              "markup": ("md", "rst"), "web": ("js", "css")}


def make_sequences(path: str, count: int = 1800, steps: int = 48, seed: int = 0) -> str:
    """npz of `count` noisy series whose class is a pattern's shape, at a random place and scale."""
    rng = np.random.default_rng(seed)
    width = 8
    ramp = np.linspace(0, np.pi, width)
    patterns = [np.sin(ramp), -np.sin(ramp), np.linspace(-1, 1, width), np.linspace(1, -1, width),
                np.abs(np.sin(2 * ramp)), np.eye(1, width, width // 2)[0] * 2.0]
    x = rng.normal(0.0, 0.35, size=(count, steps, 1)).astype(np.float32)
    y = rng.integers(0, len(patterns), count)
    for row, label in enumerate(y):
        start = rng.integers(0, steps - width + 1)
        x[row, start:start + width, 0] += rng.uniform(0.5, 2.0) * patterns[label]
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def make_glyphs(path: str, count: int = 3000, side: int = 32, seed: int = 0, corrupt: int = 5) -> str:
    """A folder of `count` 32x32 colour PNGs in 10 class folders: a digit (scikit-learn's, drawn 3x
    larger, 24x24, smoothed) at a random place, in a random foreground colour on a random background
    colour at least 120 apart, with pixel noise; and `corrupt` files that are not images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    glyph = 24
    for label in range(10):
        os.makedirs(os.path.join(path, str(label)), exist_ok=True)
    for index in range(count):
        pick = rng.integers(len(digits.target))
        label = int(digits.target[pick])
        small = Image.fromarray(np.uint8(digits.images[pick] * (255 / 16)))
        alpha = np.asarray(small.resize((glyph, glyph), Image.BILINEAR), np.float32)[..., None] / 255.0
        while True:
            foreground, background = rng.uniform(0, 255, (2, 3))
            if np.linalg.norm(foreground - background) >= 120:
                break
        canvas = np.tile(background, (side, side, 1))
        top, left = rng.integers(0, side - glyph + 1, 2)
        window = canvas[top:top + glyph, left:left + glyph]
        canvas[top:top + glyph, left:left + glyph] = window * (1 - alpha) + foreground * alpha
        canvas += rng.normal(0.0, 12.0, canvas.shape)
        Image.fromarray(np.uint8(np.clip(np.rint(canvas), 0, 255))).save(
            os.path.join(path, str(label), f"{index:05d}.png"))
    for index in range(corrupt):  # a user's folder has a few of these; they go to the dead-letter file
        with open(os.path.join(path, str(index % 10), f"corrupt-{index}.png"), "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    return f"folder:{path}"


def make_text(path: str, per_class: int = 400, seed: int = 0) -> str:
    """jsonl of `per_class` lines per file kind, sampled from the files under this Python's prefix."""
    rng = random.Random(seed)
    root = sys.prefix
    rows = []
    for label, extensions in TEXT_KINDS.items():
        files = sorted(p for ext in extensions for p in glob.glob(f"{root}/**/*.{ext}", recursive=True))
        rng.shuffle(files)
        lines: list[str] = []
        for file in files[:300]:
            try:
                with open(file, encoding="utf-8") as handle:
                    lines.extend(line.strip() for line in handle.read().split("\n")[:400])
            except (UnicodeDecodeError, OSError):
                continue
        lines = sorted({line for line in lines if line and len(line) <= 200})
        rows.extend({"text": line, "label": label} for line in rng.sample(lines, min(per_class, len(lines))))
    rng.shuffle(rows)
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return f"jsonl:{path}"


def split_arrays(run_dir: str, split: str):
    """(inputs, labels) of one split as NumPy (text as str), read through the contract."""
    from kcp.core import contract as contract_lib
    from kcp.core import examples as example_lib

    contract = contract_lib.read_contract(run_dir)
    inputs, labels = [], []
    for batch_inputs, batch_labels, _ in example_lib.read_split(contract, contract_lib.data_dir(run_dir), split, 512):
        inputs.append(batch_inputs.numpy())
        labels.append(batch_labels.numpy())
    inputs, labels = np.concatenate(inputs), np.concatenate(labels)
    if contract.modality == "text":
        return [value.decode("utf-8") for value in inputs], labels
    return inputs.reshape(len(inputs), -1).astype(np.float32), labels


def make_waves(path: str, count: int = 3000, steps: int = 40, seed: int = 0) -> str:
    """npz of `count` noisy series of 10 wave shapes at a random period, phase, amplitude and offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)
    x = np.empty((count, steps, 1), np.float32)
    y = rng.integers(0, 10, count)
    for row, label in enumerate(y):
        phase = rng.uniform(0, 1)
        u = (t / rng.uniform(8, 20) + phase) % 1.0  # position within the period, 0..1
        shapes = {0: lambda: np.sin(2 * np.pi * u), 1: lambda: np.sign(np.sin(2 * np.pi * u)),
                  2: lambda: 2 * np.abs(2 * u - 1) - 1, 3: lambda: 2 * u - 1, 4: lambda: 1 - 2 * u,
                  5: lambda: np.sin(2 * np.pi * (rng.uniform(0.02, 0.05) * t + 0.004 * t ** 2 + phase)),
                  6: lambda: np.sin(2 * np.pi * (rng.uniform(0.15, 0.2) * t - 0.0025 * t ** 2 + phase)),
                  7: lambda: 2 * np.exp(-0.5 * ((t - rng.uniform(5, 35)) / rng.uniform(2, 4)) ** 2) - 0.5,
                  8: lambda: 2 * np.exp(-t / rng.uniform(8, 15)) * np.sin(2 * np.pi * u),
                  9: lambda: np.where(t < rng.integers(8, 32), -1.0, 1.0)}
        x[row, :, 0] = rng.normal(0, 0.5) + rng.uniform(0.5, 2.0) * shapes[int(label)]() + rng.normal(0, 0.3, steps)
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def baselines(run_dir: str, modality: str) -> dict:
    """Test accuracy of logistic regression and an SVM on raw values or TF-IDF, fitted on train."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    train_x, train_y = split_arrays(run_dir, "train")
    test_x, test_y = split_arrays(run_dir, "test")
    if modality == "text":
        models = {"logistic regression, word TF-IDF": make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=2000)),
                  "logistic regression, char 1-4-gram TF-IDF": make_pipeline(
                      TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4)), LogisticRegression(max_iter=2000)),
                  "linear SVM, char 1-4-gram TF-IDF": make_pipeline(
                      TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4)), LinearSVC())}
    else:
        models = {"logistic regression, raw values": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                  "RBF SVM, raw values": make_pipeline(StandardScaler(), SVC())}
    return {name: float(model.fit(train_x, train_y).score(test_x, test_y)) for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modalities", default="image,colour,sequence,text")
    parser.add_argument("--families", default="cnn,resnet,rnn,transformer")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override; data.* keys apply to the preprocessing too")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    parser.add_argument("--sequence-count", type=int, default=1800,
                        help="generated series (1800: test 174, one standard error about 2.5 points; 6000: about 1.4)")
    parser.add_argument("--sequence-kind", choices=("patterns", "waves"), default="patterns",
                        help="patterns: 6 local shapes in 48 steps; waves: 10 whole-series shapes in 40 steps")
    parser.add_argument("--glyph-count", type=int, default=3000,
                        help="32x32 colour glyphs (3000: test about 300, one standard error about 1.5 points at 0.9)")
    parser.add_argument("--text-per-class", type=int, default=400,
                        help="text lines per class (400: test 252, one standard error about 2.5 points; "
                             "1000: test 610, about 1.4)")
    args = parser.parse_args()

    import trainer.models  # noqa: F401  registers the families
    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess
    from trainer.train import train

    work = tempfile.mkdtemp(prefix="kcp-modality-zoo-")
    sources = {"image": lambda: "digits",
               "colour": lambda: make_glyphs(os.path.join(work, "glyphs"), args.glyph_count),
               "sequence": lambda: (make_waves if args.sequence_kind == "waves" else make_sequences)(
                   os.path.join(work, "sequences.npz"), args.sequence_count),
               "text": lambda: make_text(os.path.join(work, "lines.jsonl"), args.text_per_class)}
    rows = []
    for modality in args.modalities.split(","):
        run_dir = os.path.join(work, modality)
        data_overrides = [o for o in args.overrides if o.startswith("data.")]  # e.g. data.tokenizer=characters
        contract = run_preprocess(load_config([], [f"data.source={sources[modality]()}", *data_overrides]), run_dir,
                                  IN_PROCESS_BEAM)
        counts = {name: info.count for name, info in contract.splits.items()}
        for name, accuracy in baselines(run_dir, modality).items():
            rows.append((modality, name, accuracy, float("nan")))
            print(json.dumps({"modality": modality, "model": name, "test_accuracy": accuracy}), flush=True)
        for family in [name for name in args.families.split(",") if name]:  # --families '': the baselines only
            family_run = os.path.join(work, f"{modality}-{family}")
            os.makedirs(family_run)
            os.symlink(os.path.join(run_dir, "data"), os.path.join(family_run, "data"))
            started = time.perf_counter()
            metrics = train(load_config([], [f"model.name={family}", *args.overrides]), family_run)
            wall = time.perf_counter() - started
            rows.append((modality, family, metrics["test"]["accuracy"], wall))
            print(json.dumps({"modality": modality, "model": family, "test_accuracy": metrics["test"]["accuracy"],
                              "validation_accuracy": metrics["validation"]["accuracy"],
                              "train_accuracy": metrics["train"]["accuracy"], "epochs": metrics["epochs"],
                              "wall_s": round(wall, 1), "splits": counts}), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    table = ["| modality | model | test accuracy | wall s |", "|---|---|---|---|"]
    table += [f"| {modality} | {name} | {accuracy:.4f} | {'' if wall != wall else f'{wall:.0f}'} |"
              for modality, name, accuracy, wall in rows]
    print("\n" + "\n".join(table))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
