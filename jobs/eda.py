"""spark-submit jobs/eda.py [--k 11] [--years 10] [--top 20] [--lake PATH] [--conf FILE] [--role ROLE]

Build the suppressed gold EDA tables from silver (same arguments as ``ehrlake eda``).
"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["eda", *sys.argv[1:]]))
