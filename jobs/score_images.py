"""spark-submit jobs/score_images.py [arguments of `ehrlake score-images --help`]"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["score-images", *sys.argv[1:]]))
