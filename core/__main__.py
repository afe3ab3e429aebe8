"""``python -m core``: the Protoscope command line."""

from core.cli.main import main

raise SystemExit(main())
