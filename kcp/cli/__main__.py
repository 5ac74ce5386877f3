"""`python -m kcp.cli` runs the `kcp` command (as the launchers and tests start it in a subprocess)."""

from kcp.cli import main

raise SystemExit(main())
