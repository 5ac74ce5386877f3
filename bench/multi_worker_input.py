"""Two-worker training on one machine: each worker reading its own files against every worker
reading every file.

    .venv/bin/python bench/multi_worker_input.py [--epochs 5] [--workers 2]

Preprocesses the digits twice (1 shard per split, and as many shards as workers), then trains
the default cnn with `train.strategy=multi_worker` on a TF_CONFIG cluster of local processes
(`python -m trainer.task`, as docs/training.md runs it) on each, and prints the chief's
examples/s (first epoch excluded), its test accuracy and which way the workers read
(`each worker reads its own files` needs each split's shards to split evenly among them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def train_cluster(run_dir: str, workers: int, epochs: int) -> tuple[dict, str]:
    """(the chief's metrics.json, its log) of one multi-worker training of `run_dir`."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    argv = [sys.executable, "-m", "trainer.task", "--run-dir", run_dir, "--set", "train.strategy=multi_worker",
            "--set", f"train.epochs={epochs}", "--set", "train.batch_size=32"]
    outputs = [tempfile.TemporaryFile("w+") for _ in range(workers)]  # not pipes: a full one would stall a worker
    processes = [subprocess.Popen(argv, cwd=ROOT, stdout=outputs[index], stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(
                                      {"cluster": cluster, "task": {"type": "worker", "index": index}})})
                 for index in range(workers)]
    for process in processes:
        process.wait()
    logs = []
    for output in outputs:
        output.seek(0)
        logs.append(output.read())
    for process, log in zip(processes, logs):
        if process.returncode:
            raise SystemExit(f"a worker failed:\n{log[-3000:]}")
    with open(os.path.join(run_dir, "train", "metrics.json")) as handle:
        return json.load(handle), logs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import trainer.models  # noqa: F401  registers the families the config loader validates
    from kcp.core.config_load import load_config
    from pipeline.preprocess import run_preprocess

    root = tempfile.mkdtemp(prefix="kcp-multi-worker-")
    for shards in (1, args.workers):
        run_dir = os.path.join(root, f"shards-{shards}")
        run_preprocess(load_config([], [f"data.num_shards={shards}"]), run_dir,
                       ["--runner=FnApiRunner", "--direct_running_mode=in_memory"])
        metrics, log = train_cluster(run_dir, args.workers, args.epochs)
        reading = next((line.split("; ")[-1] for line in log.splitlines() if "each worker reads" in line), "?")
        print(f"{shards} shard(s) per split: {metrics['examples_per_second']:.0f} examples/s, test accuracy "
              f"{metrics['test']['accuracy']:.4f}, {metrics['wall_seconds']:.1f} s ({reading})")


if __name__ == "__main__":
    main()
