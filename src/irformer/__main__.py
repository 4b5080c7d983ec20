"""``python -m irformer ...``: the same entry point as the ``irformer`` script."""

import sys

from irformer.cli import main

sys.exit(main())
