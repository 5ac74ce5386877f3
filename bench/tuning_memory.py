"""Memory across tuning trials in one process: RSS after trial 10 against after trial 2.

    .venv/bin/python bench/tuning_memory.py [--trials 10] [--model cnn]

Preprocesses digits, runs a random search of --trials trials in this process (the tuner
clears the Keras session after each), and prints RSS per trial from trials.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--model", default="cnn")
    args = parser.parse_args()

    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess
    from tuning.search import run_search

    run_dir = tempfile.mkdtemp(prefix="kcp-tune-memory-")
    run_preprocess(load_config(), run_dir, ["--runner=FnApiRunner", "--direct_running_mode=in_memory"])
    config = load_config([], [f"model.name={args.model}", "train.epochs=3", f"tune.max_trials={args.trials}"])
    run_search(config, run_dir)
    with open(os.path.join(run_dir, "tuning", "trials.csv")) as handle:
        rows = list(csv.DictReader(handle))
    rss = [float(row["rss_mb"]) for row in rows]
    for row in rows:
        print(f"trial {int(row['trial_id']) + 1:>2}: {float(row['rss_mb']):7.0f} MiB  {row['seconds']} s")
    if len(rss) >= 10:
        print(f"\nRSS after trial 10 / after trial 2: {rss[9] / rss[1]:.3f} ({rss[9] - rss[1]:+.0f} MiB)")


if __name__ == "__main__":
    main()
