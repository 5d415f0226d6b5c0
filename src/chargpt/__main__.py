"""`python -m chargpt` runs the CLI."""

import sys

from chargpt.cli import main

sys.exit(main())
