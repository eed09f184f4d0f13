"""spark-submit jobs/features.py [arguments of `ehrlake features --help`]"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
