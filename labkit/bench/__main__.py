"""`python -m labkit.bench ...`, the same command as `python -m labkit bench ...`."""

import sys

from labkit.bench.cli import main

sys.exit(main())
