"""The official SQL on FHIR v2 test suite, run case by case on Spark.

Each test file has FHIR ``resources`` and ``tests``; a case passes when the view's rows equal
``expect`` (as a multiset), its columns equal ``expectColumns``, or, for ``expectError``, when the
view is rejected or its query fails. Used by ``tests/test_sql_on_fhir.py`` and by
``scripts/sql_on_fhir_report.py`` (which writes ``docs/sql_on_fhir.md``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ehrlake.views import definition, runner

# Optional (experimental) cases this runner does not pass, and why. The conformance test expects
# exactly these to fail, so the list cannot go stale.
UNSUPPORTED = {
    ("fn_boundary.json", "decimal lowBoundary"): "VARIANT keeps a decimal's value, not its written "
    "precision (1.0 is stored as 1), so the boundary of 1.0 cannot be told from that of 1",
    ("fn_boundary.json", "decimal highBoundary"): "as for lowBoundary",
}


@dataclass(frozen=True)
class CaseResult:
    file: str
    title: str
    tags: tuple[str, ...]
    outcome: str  # passed | failed
    detail: str = ""


def cases(folder: str | Path) -> list[tuple[str, dict, dict]]:
    """(file name, file, case) for every case of every test file in ``folder``."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        suite = json.loads(path.read_text())
        if not isinstance(suite, dict) or "tests" not in suite:
            continue
        out += [(path.name, suite, case) for case in suite["tests"]]
    return out


def _normal(value):
    """Values compared as JSON would: 1 == 1.0, lists element-wise."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return round(float(value), 9) if not math.isnan(value) else "NaN"
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _rows(frame) -> list[dict]:
    return [row.asDict(recursive=True) for row in frame.collect()]


def _key(row: dict) -> str:
    return json.dumps({k: _normal(v) for k, v in sorted(row.items())}, sort_keys=True, default=str)


def run_case(spark, suite: dict, case: dict, file: str = "") -> CaseResult:
    tags = tuple(case.get("tags") or suite.get("tags") or ())
    title = case.get("title", "")

    def result(ok: bool, detail: str = "") -> CaseResult:
        return CaseResult(file, title, tags, "passed" if ok else "failed", detail)

    resources = spark.createDataFrame(
        [(json.dumps(r),) for r in suite.get("resources", [])], "resource string"
    )
    try:
        view = definition.parse(case["view"])
        frame = runner.run(view, resources)
        if case.get("expectError"):
            frame.collect()
            return result(False, "expected an error, the view ran")
        if "expectColumns" in case:
            got = frame.columns
            return result(got == case["expectColumns"], f"columns {got}")
        got = sorted(_key(r) for r in _rows(frame))
        want = sorted(_key(r) for r in case.get("expect", []))
        return result(got == want, "" if got == want else f"got {got[:6]} want {want[:6]}")
    except Exception as e:  # noqa: BLE001 - a case's outcome, whatever failed
        if case.get("expectError"):
            return result(True, type(e).__name__)
        return result(False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")


def run_suite(spark, folder: str | Path) -> list[CaseResult]:
    return [run_case(spark, suite, case, name) for name, suite, case in cases(folder)]


def expected_results(folder: str | Path) -> list[CaseResult]:
    """What :func:`run_suite` gives when every case outside :data:`UNSUPPORTED` passes (the
    conformance test checks exactly that, case by case), so the report can be checked cheaply."""
    out = []
    for name, suite, case in cases(folder):
        tags = tuple(case.get("tags") or suite.get("tags") or ())
        failed = (name, case.get("title", "")) in UNSUPPORTED
        out.append(CaseResult(name, case.get("title", ""), tags, "failed" if failed else "passed"))
    return out


def render_markdown(results: list[CaseResult]) -> str:
    """``docs/sql_on_fhir.md``'s results section: totals per tag and per file, and what fails why."""
    by_tag: dict[str, list[int]] = {}
    by_file: dict[str, list[int]] = {}
    for r in results:
        ok = r.outcome == "passed"
        for tag in r.tags or ("(untagged)",):
            counts = by_tag.setdefault(tag, [0, 0])
            counts[0 if ok else 1] += 1
        counts = by_file.setdefault(r.file, [0, 0])
        counts[0 if ok else 1] += 1
    passed = sum(r.outcome == "passed" for r in results)
    lines = [
        f"**{passed} of {len(results)} cases pass.**",
        "",
        "| tag | passed | failed |",
        "|---|---:|---:|",
        *[f"| {tag} | {p} | {f} |" for tag, (p, f) in sorted(by_tag.items())],
        "",
        "| test file | passed | failed |",
        "|---|---:|---:|",
        *[f"| `{name}` | {p} | {f} |" for name, (p, f) in sorted(by_file.items())],
        "",
    ]
    failed = [r for r in results if r.outcome != "passed"]
    if failed:
        lines += ["Cases that fail, and why:", ""]
        for r in failed:
            why = UNSUPPORTED.get((r.file, r.title), r.detail)
            lines.append(f"- `{r.file}` / {r.title} ({', '.join(r.tags)}): {why}")
        lines.append("")
    return "\n".join(lines)
