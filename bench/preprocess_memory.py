"""Driver memory, job graph size and wall time of `kcp preprocess` on text CSVs of growing size.

    .venv/bin/python bench/preprocess_memory.py [--rows 20000 1000000] [--workers 2]

For each row count: writes a synthetic 6-class text CSV (about 130 bytes a row, the shape of
issue 11's figures), then runs `kcp preprocess --source csv:FILE --set data.augment.copies=0`
in a fresh process (FnApiRunner, multi-processing with --workers processes, so the runner
choice by size does not change between the points) and prints, per point: the CSV size, the
job graph (`pipeline.to_runner_api()` bytes, built without running), the largest peak RSS of
any process of the run (getrusage of the waited children: the CLI and its Beam workers) and
the wall time. The last line is the peak-RSS ratio of the largest to the smallest point.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def write_csv(path: str, rows: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w") as handle:
        handle.write("text,label\n")
        for index in range(rows):
            label = index % 6
            text = " ".join(rng.choice(WORDS) for _ in range(18)) + f" class{label}"
            handle.write(f"\"{text}\",c{label}\n")


def graph_bytes(csv_path: str, workdir: str) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    import trainer.models  # noqa: F401  registers the families the config loader checks
    from kcp.core.config_load import load_config
    from kcp.core.sources import plan_source
    from pipeline.preprocess import build_pipeline

    config = load_config([], [f"data.source=csv:{csv_path}", "data.augment.copies=0"])
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    build_pipeline(pipeline, plan_source(config.data.source, config.data), config, workdir,
                   os.path.join(workdir, "s.json"), os.path.join(workdir, "parts"))
    return len(pipeline.to_runner_api().SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    peaks = []
    with tempfile.TemporaryDirectory() as workdir:
        print("| rows | CSV MB | graph bytes | largest process peak RSS GB | wall s |")
        print("|---|---|---|---|---|")
        for rows in args.rows:
            path = os.path.join(workdir, f"t{rows}.csv")
            write_csv(path, rows)
            graph = graph_bytes(path, os.path.join(workdir, f"g{rows}"))
            command = [sys.executable, "-c", "import sys, resource, subprocess; "
                       "code = subprocess.call(sys.argv[1:]); "
                       "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)",
                       sys.executable, "-m", "kcp.cli", "preprocess", "--source", f"csv:{path}",
                       "--run-dir", os.path.join(workdir, f"run{rows}"), "--set", "data.augment.copies=0",
                       "--", "--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"]
            started = time.perf_counter()
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if result.returncode:
                sys.exit(result.stdout[-3000:] + result.stderr[-3000:])
            peak_kb = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("PEAK")))
            peaks.append(peak_kb)
            print(f"| {rows:,} | {os.path.getsize(path) / 1e6:.1f} | {graph:,} | {peak_kb / 2**20:.2f} | {wall:.0f} |",
                  flush=True)
    print(f"peak RSS ratio, {args.rows[-1]:,} / {args.rows[0]:,} rows: {peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
