"""Vertex AI / cloud launcher entry of the trainer.

    python -m trainer.task --job-dir gs://bucket/runs/r1 --set train.epochs=30

Flags are those of `kcp train` (`--job-dir` is an alias of `--run-dir`); flags a launcher
adds that the trainer does not know are ignored with a warning. With `AIP_MODEL_DIR` set, the
validated serving export is handed to Vertex AI there too (`kcp.cli.launch_training`).
"""

from __future__ import annotations

import sys

from kcp import cli


def main(argv: list[str] | None = None) -> int:
    # no argv: this process's own entry, which ends when the stage does (cli.main's `console`)
    return cli.launch_training(list(sys.argv[1:] if argv is None else argv), console=argv is None)


if __name__ == "__main__":
    raise SystemExit(main())
