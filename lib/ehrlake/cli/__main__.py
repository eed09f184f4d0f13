"""``python -m ehrlake.cli ...``: the ``ehrlake`` command without its console script (benchmarks
start it so, with the interpreter they run under)."""

import sys

from ehrlake.cli import console

sys.exit(console())
