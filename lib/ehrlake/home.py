"""Where the platform's declarations live (``conf/``, ``data/reference/``): ``$EHRLAKE_HOME``, else
the checkout this library was loaded from.

A driver that imports ehrlake from a wheel (``spark-submit --py-files dist/ehrlake-*.whl``) has no
checkout around the library, so it reads ``conf/`` from ``$EHRLAKE_HOME`` (the job image sets it to
``/opt/ehrlake``; docs/operations.md).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME = Path(os.environ.get("EHRLAKE_HOME") or Path(__file__).resolve().parents[2])
CONF = HOME / "conf"
