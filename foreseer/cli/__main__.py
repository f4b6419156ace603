"""`python -m foreseer.cli ...`: the `foreseer` command."""

import sys

from foreseer.cli import main

sys.exit(main())
