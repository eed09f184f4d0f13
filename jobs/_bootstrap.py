"""Make ``ehrlake`` importable when a job is submitted from a checkout without installing it.

On a cluster, ship the library with ``--py-files dist/ehrlake-*.whl`` instead (docs/operations.md).
"""

import os
import sys

try:
    import ehrlake  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
