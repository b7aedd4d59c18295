"""``python -m sidecar`` is ``cache-sidecar``."""

from sidecar.cli import main

raise SystemExit(main())
