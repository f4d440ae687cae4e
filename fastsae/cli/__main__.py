"""`python -m fastsae.cli ...` (and torchrun's `-m fastsae.cli`)."""

import sys

from fastsae.cli import main

sys.exit(main())
