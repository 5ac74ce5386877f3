"""Test accuracy of each model family on the embedded digits, with default settings.

    .venv/bin/python bench/zoo_accuracy.py [--families cnn,resnet,rnn,transformer] [--set KEY=VALUE ...]

Preprocesses digits once (the same split `kcp run` uses), then trains each family with its
default config (as `kcp run --model NAME` would) and prints a Markdown table of test
accuracy, epochs, parameters, throughput and wall time. The README's table comes from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="cnn,resnet,rnn,transformer")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess
    from trainer.train import train

    run_dir = tempfile.mkdtemp(prefix="kcp-zoo-")
    run_preprocess(load_config(), run_dir, ["--runner=FnApiRunner", "--direct_running_mode=in_memory"])
    rows = []
    for family in args.families.split(","):
        config = load_config([], [f"model.name={family}", *args.overrides])
        started = time.perf_counter()
        metrics = train(config, run_dir)
        rows.append((family, metrics["test"]["accuracy"], metrics["epochs"], metrics["params"],
                     metrics["examples_per_second"], time.perf_counter() - started))
        print(json.dumps({"family": family, "test_accuracy": metrics["test"]["accuracy"]}), flush=True)
    print("\n| model | test accuracy | epochs | parameters | train examples/s | wall s |")
    print("|---|---|---|---|---|---|")
    for family, accuracy, epochs, params, speed, wall in rows:
        print(f"| {family} | {accuracy:.4f} | {epochs} | {params:,} | {speed:,.0f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
