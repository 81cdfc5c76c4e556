"""``python -m lycolab`` runs the CLI."""

import sys

from lycolab.cli import main

sys.exit(main())
