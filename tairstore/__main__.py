"""``python -m tairstore`` runs the command line."""

import sys

from tairstore.cli import main

sys.exit(main())
