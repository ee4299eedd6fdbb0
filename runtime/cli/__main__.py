"""`python -m runtime.cli ...` is `facert ...`."""

import sys

from runtime.cli import main

sys.exit(main())
