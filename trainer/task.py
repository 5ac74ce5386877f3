"""Vertex AI / cloud launcher entry of the trainer.

    python -m trainer.task --job-dir gs://bucket/runs/r1 --set train.epochs=30

Flags are those of `kcp train` (`--job-dir` is an alias of `--run-dir`); flags a launcher
adds that the trainer does not know are ignored with a warning.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from kcp import cli

    return cli.main(["train", *(argv if argv is not None else cli.sys_argv())], lenient=True)


if __name__ == "__main__":
    raise SystemExit(main())
