"""``python -m core``: the Influence Atlas command line."""

import sys

from core.cli import main

sys.exit(main())
