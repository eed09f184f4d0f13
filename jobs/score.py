"""spark-submit jobs/score.py [arguments of `ehrlake score --help`]"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
