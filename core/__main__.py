"""``python -m core``: the Protoscope command line."""

from core.cli import main

raise SystemExit(main())
