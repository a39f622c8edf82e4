"""`python -m lightning_modules.cli` = `svp`."""

import sys

from lightning_modules.cli import main

sys.exit(main())
