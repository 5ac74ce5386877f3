"""Cloud launcher entry of the export stage.

    python -m deploy.task --job-dir gs://bucket/runs/r1 --set export.name=digits

Flags are those of `kcp export`; flags a launcher adds that the stage does not know are
ignored with a warning. A leaf: nothing imports this module.
"""

from __future__ import annotations

import sys

from kcp import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["export", *(sys.argv[1:] if argv is None else argv)], lenient=True)


if __name__ == "__main__":
    raise SystemExit(main())
