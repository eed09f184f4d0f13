"""spark-submit jobs/clean.py [--sources fhir,synthea] [--incremental] [--lake PATH] [--conf FILE]
[--role ROLE]

Rebuild the silver tables from bronze (same arguments as ``ehrlake clean``).
"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
