"""`python -m volplane`: the same command line as the `volplane` script."""

import sys

from .cli import main

sys.exit(main())
