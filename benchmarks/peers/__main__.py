"""``python -m benchmarks.peers``: one peer run (see :mod:`benchmarks.peers.job`)."""

import sys

from benchmarks.peers.job import main

sys.exit(main())
