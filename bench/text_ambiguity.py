"""How much of the text set of bench/modality_zoo.py is ambiguous by construction.

    .venv/bin/python bench/text_ambiguity.py [--text-per-class 1000]

Each line of the set is labelled by the kind of file it was drawn from. This counts the drawn lines
that occur, verbatim, in files of two or more of the six kinds (every file of each kind under this
Python's prefix, not only the ones sampled): no classifier can tell those apart better than by
the kinds' frequencies. It also scores stronger classical models than the table's baselines on
three random splits (80/20, stratified), to see where linear models on character n-grams level off.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def kind_lines() -> dict[str, set]:
    """{kind: every stripped line of every file of that kind under sys.prefix}."""
    from modality_zoo import TEXT_KINDS

    lines = {}
    for label, extensions in TEXT_KINDS.items():
        found = set()
        for path in (p for ext in extensions for p in glob.glob(f"{sys.prefix}/**/*.{ext}", recursive=True)):
            try:
                with open(path, encoding="utf-8") as handle:
                    found.update(line.strip() for line in handle.read().split("\n"))
            except (UnicodeDecodeError, OSError):
                continue
        lines[label] = found
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-per-class", type=int, default=1000)
    args = parser.parse_args()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    from modality_zoo import make_text

    path = os.path.join(tempfile.mkdtemp(), "lines.jsonl")
    make_text(path, args.text_per_class)
    rows = [json.loads(line) for line in open(path)]
    every = kind_lines()
    kinds = collections.Counter(sum(row["text"] in found for found in every.values()) for row in rows)
    shared = sum(count for k, count in kinds.items() if k > 1)
    print(f"{len(rows)} lines; in files of 1 kind: {kinds[1]}, of 2 or more kinds: {shared} "
          f"({100 * shared / len(rows):.1f}%): {dict(sorted(kinds.items()))}")
    texts, labels = [row["text"] for row in rows], np.array([row["label"] for row in rows])
    alone = [sum(row["text"] in found for found in every.values()) <= 1 for row in rows]
    models = {
        "linear SVM, char_wb 1-4-gram TF-IDF (the table's)": lambda: make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4)), LinearSVC()),
        "linear SVM, char 1-5-gram TF-IDF, sublinear, C=0.5": lambda: make_pipeline(
            TfidfVectorizer(analyzer="char", ngram_range=(1, 5), sublinear_tf=True), LinearSVC(C=0.5)),
        "linear SVM, char 1-6-grams + word 1-2-grams": lambda: make_pipeline(make_union(
            TfidfVectorizer(analyzer="char", ngram_range=(1, 6), sublinear_tf=True),
            TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True)), LinearSVC(C=0.5)),
    }
    # the last: the table's SVM on the lines of one kind only (the shared ones dropped before splitting)
    runs = [(name, make, texts, labels) for name, make in models.items()]
    runs.append(("the table's linear SVM, lines of one kind only", models[next(iter(models))],
                 [t for t, keep in zip(texts, alone) if keep], labels[np.array(alone)]))
    for name, make, inputs, targets in runs:
        scores = []
        for seed in range(3):
            train_x, test_x, train_y, test_y = train_test_split(inputs, targets, test_size=0.2, random_state=seed,
                                                                stratify=targets)
            scores.append(make().fit(train_x, train_y).score(test_x, test_y))
        print(f"{name}: {' '.join(f'{s:.4f}' for s in scores)} (mean {np.mean(scores):.4f})")


if __name__ == "__main__":
    main()
