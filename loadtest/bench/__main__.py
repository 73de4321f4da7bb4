"""``python -m loadtest.bench``: see the package's docstring."""

import sys

from loadtest.bench.cli import main

sys.exit(main())
