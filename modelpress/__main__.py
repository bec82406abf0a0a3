"""``python -m modelpress`` is the ``modelpress`` command."""

from .cli import main

raise SystemExit(main())
