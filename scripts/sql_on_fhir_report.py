"""Run the official SQL on FHIR v2 test suite and rewrite the results section of docs/sql_on_fhir.md.

    .venv/bin/python scripts/sql_on_fhir_report.py [--suite ../shared/data/sql_on_fhir_v2_tests]

The section sits between the two RESULTS markers; tests/test_sql_on_fhir.py checks it is current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "sql_on_fhir.md"
BEGIN, END = "<!-- RESULTS BEGIN -->", "<!-- RESULTS END -->"


def replace_results(doc: str, section: str) -> str:
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{section}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=str(REPO.parent / "shared" / "data" / "sql_on_fhir_v2_tests"))
    args = parser.parse_args()
    from ehrlake.config import Config, SparkConfig
    from ehrlake.session import get_spark
    from ehrlake.views import conformance

    spark = get_spark(Config(spark=SparkConfig(master="local[2]")))
    results = conformance.run_suite(spark, args.suite)
    unexpected = [
        r for r in results if (r.outcome == "passed") == ((r.file, r.title) in conformance.UNSUPPORTED)
    ]
    for r in unexpected:
        print(f"unexpected outcome: {r.file} / {r.title}: {r.outcome} {r.detail}", file=sys.stderr)
    DOC.write_text(replace_results(DOC.read_text(), conformance.render_markdown(results)))
    passed = sum(r.outcome == "passed" for r in results)
    print(f"{passed}/{len(results)} cases pass; wrote {DOC.relative_to(REPO)}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
