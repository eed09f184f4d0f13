"""spark-submit jobs/lake_show.py [--json] [--lake PATH]: every table with version, rows, last operation."""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["lake", "show", *sys.argv[1:]]))
