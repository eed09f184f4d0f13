"""spark-submit jobs/evaluate.py [arguments of `ehrlake evaluate --help`]"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
