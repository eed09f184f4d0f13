"""spark-submit jobs/synth.py --patients N --out PATH [--seed S] [--fault-rate R] [--conf FILE]

Generate a population of N patients from the bundled sample records (same arguments as
``ehrlake synth``); the output is input for ``jobs/ingest.py --source synthea-csv``.
"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
