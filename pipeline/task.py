"""Cloud launcher entry of the preprocessing stage (Dataflow, a scheduler, a shell).

    python -m pipeline.task --run-dir gs://bucket/runs/r1 --source csv:gs://bucket/reviews.csv \
        -- --runner DataflowRunner --project P --region R --temp_location gs://bucket/tmp --setup_file ./setup.py

Flags are those of `kcp preprocess`; Beam options go after `--`. Flags a launcher adds that
the stage does not know are ignored with a warning. A leaf: nothing imports this module.
"""

from __future__ import annotations

import sys

from kcp import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["preprocess", *(sys.argv[1:] if argv is None else argv)], lenient=True)


if __name__ == "__main__":
    raise SystemExit(main())
