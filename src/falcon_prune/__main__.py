"""``python -m falcon_prune``: the command line."""

import sys

from falcon_prune.cli import main

sys.exit(main())
