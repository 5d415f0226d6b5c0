"""`python -m chargpt.cli` (what torchrun launches) runs the CLI."""

import sys

from chargpt.cli.commands import main

sys.exit(main())
