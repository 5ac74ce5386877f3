"""Peak memory of a gpt export's `score` signature on one long text, a fresh process per size.

    .venv/bin/kcp run --run-dir /tmp/score-run --source python-stdlib --model gpt \
        --set model.layers=1 --set model.dim=64 --set train.epochs=1
    .venv/bin/python bench/score_memory.py --run-dir /tmp/score-run --sizes 100000,300000,1000000

Each size scores one text of that many bytes (a repeated line of code; the byte vocabulary: one
token a byte) in its own process, and prints the growth of the process's peak resident memory
over the loaded export, and the seconds of the call. Measured 2026-11-29 on the 2-core machine
(context 256, 258-id vocabulary, width 64, one layer):

    bytes      tokens   peak MB over load   seconds   before (whole text's logits at once)
    100000     100001   148                 0.66      654 MB, 0.63 s
    300000     300001   155                 1.13      1992 MB, 1.55 s
    1000000   1000001   280                 3.93      about 6.6 GB (extrapolated: 6.6 KB a token)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CHILD = """
import resource, sys, time
import tensorflow as tf
size = int(sys.argv[2])
score = tf.saved_model.load(sys.argv[1]).signatures["score"]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
text = ("def g(x):\\n    return x * 3 + 1  # a comment\\n" * (size // 44 + 1))[:size]
started = time.perf_counter()
outputs = score(texts=tf.constant([text.encode()]))
seconds = time.perf_counter() - started
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024
print(f"{size:<10} {int(outputs['tokens'][0]):<8} {grown:<19} {seconds:.2f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="a gpt run with a blessed export")
    parser.add_argument("--sizes", default="100000,300000,1000000", help="text sizes in bytes, comma-separated")
    args = parser.parse_args()
    versions = sorted(int(name) for name in os.listdir(os.path.join(args.run_dir, "export", "model")) if name.isdigit())
    export = os.path.join(args.run_dir, "export", "model", str(versions[-1]))
    print(f"{export}\nbytes      tokens   peak MB over load   seconds")
    for size in (int(part) for part in args.sizes.split(",")):
        child = subprocess.run([sys.executable, "-c", CHILD, export, str(size)], capture_output=True, text=True)
        if child.returncode:  # TensorFlow's native start-up lines go to stderr: shown only when the child fails
            sys.exit(f"score_memory: size {size} failed:\n{child.stderr}")
        print(child.stdout, end="", flush=True)


if __name__ == "__main__":
    main()
