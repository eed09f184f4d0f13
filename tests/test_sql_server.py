"""`ehrlake serve sql`: real Spark Connect and Thrift JDBC servers (their own process and JVM) serving
the analyst's views, queried by real clients in other processes: PySpark's Connect client
(`SparkSession.builder.remote`) and Hive's JDBC driver through `beeline`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO
from fhir_fixtures import condition, patient, write_ndjson
from pyspark.sql import functions as F

from ehrlake import ingest
from ehrlake.ingest import SourceKind
from ehrlake.ports import free_port
from ehrlake.security.audit import TABLE as AUDIT

CLIENT = r"""
import json, sys
from pyspark.sql import SparkSession, functions as F
url, attempts = sys.argv[1], json.loads(sys.argv[2])
spark = SparkSession.builder.remote(url).getOrCreate()
out = {}
for name, code in attempts.items():
    try:
        out[name] = {"rows": [r.asDict() if hasattr(r, "asDict") else r for r in eval(code)]}
    except Exception as exc:
        out[name] = {"error": str(exc).strip().splitlines()[0][:400]}
print("RESULT " + json.dumps(out, default=str))
"""


def _beeline(url: str, password: str, statements: list[str]) -> subprocess.CompletedProcess:
    """Hive's JDBC client (beeline, in PySpark's JARs), every statement run even after one fails."""
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write("".join(f"{statement};\n" for statement in statements))
        script.flush()
        return subprocess.run(
            ["java", "-cp", f"{jars}/*", "org.apache.hive.beeline.BeeLine", "-u", url, "-n", "analyst",
             "-p", password, "--outputformat=csv2", "--force=true", "-f", script.name],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip


def _client(url: str, attempts: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, url, json.dumps(attempts)],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture
def served(lake, tmp_path):
    """A lake with bronze and silver tables and a gold aggregate, served to the analyst role."""
    from ehrlake.lake import _native

    if not _native.available(lake.spark):
        pytest.skip("Delta Lake JARs not on Spark's class path (make setup fetches them)")
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1", family="Raghunathan"), patient("p2")])
    write_ndjson(tmp_path / "in" / "Condition.ndjson", [condition("c1", "p1"), condition("c2", "p2")])
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"))
    conditions = lake.read("bronze.fhir_condition")
    lake.write(conditions.groupBy("code").agg(F.count("*").alias("n")), "gold.condition_counts")
    # source_file is among the columns the policy hides from analysts
    lake.write(conditions.select("patient_key", "code", "source_file"), "silver.condition_rows")
    port, jdbc_port, token_file = free_port(), free_port(), tmp_path / "server.token"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "ehrlake"), "serve", "sql", "--role", "analyst", "--lake", lake.root,
         "--port", str(port), "--jdbc-port", str(jdbc_port), "--token-file", str(token_file), "--for", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=dict(os.environ),
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not token_file.exists():
        assert server.poll() is None, server.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the server did not start within 3 minutes"
        time.sleep(1)
    # the token file is written once both ports take connections
    yield (
        lake,
        f"sc://localhost:{port}",
        f"jdbc:hive2://127.0.0.1:{jdbc_port}/default",
        token_file.read_text(),
    )
    server.terminate()
    assert server.wait(timeout=120) == 0, server.stdout.read()[-3000:]
    assert not token_file.exists()  # the token goes with the server


@pytest.mark.slow
def test_connect_clients_read_the_analysts_views_and_nothing_else_all_audited(served):
    lake, url, jdbc, token = served
    result = _client(
        f"{url}/;token={token}",
        {
            "gold": "spark.sql('SELECT code, n FROM gold.condition_counts ORDER BY code').collect()",
            "silver": "spark.table('silver.condition_rows').collect()",
            "columns": "[{'c': c} for c in spark.table('gold.condition_counts').columns]",
            "bronze": "spark.sql('SELECT * FROM bronze.fhir_patient').collect()",
            "path": f"spark.read.format('delta').load({lake.path('bronze.fhir_patient')!r}).collect()",
            "file": "spark.read.text('/etc/hostname').collect()",
            "udf": "spark.range(1).select(F.udf(lambda x: open('/etc/hostname').read())('id')).collect()",
            "reflect": "spark.sql(\"SELECT reflect('java.lang.System', 'getenv', 'HOME')\").collect()",
            "set": "spark.sql('SET spark.sql.runSQLOnFiles=true').collect()",
            "ddl": "spark.sql('CREATE VIEW gold.mine AS SELECT 1').collect()",
        },
    )
    assert [r["n"] for r in result["gold"]["rows"]] == [2]  # both conditions share a code
    assert [r["c"] for r in result["columns"]["rows"]] == ["code", "n"]
    assert sorted(result["silver"]["rows"][0]) == ["code", "patient_key"]  # source_file hidden
    assert len(result["silver"]["rows"]) == 2
    for refused in ("bronze", "path", "file", "udf", "reflect", "set", "ddl"):
        assert "error" in result[refused], f"{refused} was let through: {result[refused]}"
    assert "client code does not run here" in result["udf"]["error"]
    assert "client code does not run here" in result["reflect"]["error"]
    assert "only queries run here" in result["set"]["error"]
    wrong = _client(f"{url}/;token=not-the-token", {"gold": "spark.sql('SELECT 1').collect()"})
    assert "error" in wrong["gold"]  # no token, no session
    by_jdbc = _beeline(
        jdbc,
        token,
        [
            "SELECT code, n FROM gold.condition_counts",
            "SELECT * FROM bronze.fhir_patient",
            f"SELECT * FROM delta.`{lake.path('bronze.fhir_patient')}`",
        ],
    )
    lines = by_jdbc.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.endswith("code,n")), None)  # after a prompt
    assert header is not None, (by_jdbc.stdout[-2000:], by_jdbc.stderr[-3000:])
    assert lines[header + 1] == f"{result['gold']['rows'][0]['code']},2", by_jdbc
    assert "TABLE_OR_VIEW_NOT_FOUND" in by_jdbc.stderr and "ehrlake: only this role" in by_jdbc.stderr
    refused = _beeline(jdbc, "not-the-token", ["SELECT 1"])
    assert "wrong token" in refused.stderr or "Could not open" in refused.stderr, refused
    time.sleep(2)  # the server writes its events to the audit log every half second
    events = [r.asDict() for r in lake.read(AUDIT).where(F.col("action") == "sql").orderBy("seq").collect()]
    assert all(e["role"] == "analyst" for e in events)
    allowed = [e for e in events if e["outcome"] == "allowed"]
    assert any(
        e["table_name"] == "gold.condition_counts" and e["detail"].startswith("SELECT code, n")
        for e in allowed
    ), [(e["outcome"], e["table_name"], e["detail"][:300]) for e in events]
    denied = [e["detail"] for e in events if e["outcome"] == "denied"]
    assert sum(d.startswith("SELECT * FROM bronze.fhir_patient") for d in denied) == 2  # Connect, JDBC
    assert sum(e["detail"] == "SELECT code, n FROM gold.condition_counts" for e in allowed) == 1  # JDBC
    assert any("SET spark.sql.runSQLOnFiles" in d for d in denied)
    assert len(denied) >= 6


def test_a_session_token_can_be_passed_on_any_command_line():
    """beeline read a token starting with "-" as an option (its usage text, no connection): one
    URL-safe base64 token in 64 did. Tokens are 256 bits and never start so."""
    from ehrlake.sql.server import new_token

    tokens = {new_token() for _ in range(3000)}
    assert len(tokens) == 3000 and all(len(t) == 64 and t.isalnum() for t in tokens)
