"""``python -m vmc``: the same as the ``vmc`` command."""

from vmc.cli import main

raise SystemExit(main())
