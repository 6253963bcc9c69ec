"""``python -m kvoverlay``: the command line."""

from kvoverlay.cli import main

raise SystemExit(main())
