"""``python -m mir_lightning evaluate ...``: the ``mir-lightning`` command."""

import sys

from mir_lightning.cli import main

sys.exit(main())
