"""spark-submit jobs/ingest.py --source fhir-ndjson|fhir-bundles|synthea-csv|csv-extract --input PATH
                             [--extract NAME] [--lake PATH] [--conf FILE]

Load EHR dumps into bronze Delta tables (same arguments as ``ehrlake ingest``).
"""

import sys

import _bootstrap  # noqa: F401

from ehrlake.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
