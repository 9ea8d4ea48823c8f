"""``python -m fxcache``: the same command line as ``fxcache`` (see :mod:`fxcache.cli`)."""

import sys

from .cli import main

sys.exit(main())
