"""Vertex AI / cloud launcher entry of the tuner.

    python -m tuning.task --job-dir gs://bucket/runs/r1 --set tune.algorithm=bayesian

Flags are those of `kcp tune`; unknown launcher flags are ignored with a warning. For a
distributed search, give `--role chief|worker` and `--oracle HOST:PORT`, or set Keras
Tuner's KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT. With `AIP_MODEL_DIR`
and `tune.retrain_best`, the validated export of the best config is handed to Vertex AI there too
(`kcp.cli.launch_training`).
"""

from __future__ import annotations

import sys

from kcp import cli


def main(argv: list[str] | None = None) -> int:
    # no argv: this process's own entry, which ends when the stage does (cli.main's `console`)
    return cli.launch_training(list(sys.argv[1:] if argv is None else argv), "tune", console=argv is None)


if __name__ == "__main__":
    raise SystemExit(main())
