"""``python -m cbq_lightning.peers``: one peer run (see :mod:`cbq_lightning.peers.job`)."""

import sys

from cbq_lightning.peers.job import main

sys.exit(main())
