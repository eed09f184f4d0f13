"""spark-submit jobs/train.py [arguments of `ehrlake train --help`]"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
