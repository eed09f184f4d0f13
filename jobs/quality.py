"""spark-submit jobs/quality.py [--checks FILE] [--lake PATH] [--conf FILE] [--role ROLE]

Data-quality checks over silver and the readiness scorecard (same arguments as ``ehrlake quality``).
"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["quality", *sys.argv[1:]]))
