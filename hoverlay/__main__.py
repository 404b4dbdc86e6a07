"""``python -m hoverlay``: the same command line as the ``hoverlay`` console script."""

import sys

from .cli import main

sys.exit(main())
