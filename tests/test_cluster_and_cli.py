"""End to end as users run it: the CLI, spark-submit on a real standalone cluster, and a crash mid-run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, shared
from deltalake import DeltaTable

from ehrlake.ports import free_port
from ehrlake.security.crypto import decrypt_batch, key_id_of

PYTHON = sys.executable
BIN = Path(PYTHON).parent


def env(**extra) -> dict:
    return {
        **os.environ,
        "PYSPARK_PYTHON": PYTHON,
        "PYSPARK_DRIVER_PYTHON": PYTHON,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


def ehrlake(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ehrlake"), *args],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=kw.get("timeout", 600),
    )


def ndjson_ingest_args(lake: Path) -> list[str]:
    """The ingest arguments every end-to-end test here uses: the Pathling NDJSON sample into ``lake``."""
    return ["--source", "fhir-ndjson", "--input", str(shared("fhir_ndjson_pathling")), "--lake", str(lake)]


def _opened(name: str, table: DeltaTable, ref):
    """The table's rows as pandas with sealed columns decrypted (ciphertexts differ run to run,
    their plaintext must not)."""
    df = table.to_pandas()
    for field in table.schema().fields:
        sealed = (field.metadata or {}).get("ehrlake.sealed")
        if not sealed:
            continue
        sealed = json.loads(sealed) if isinstance(sealed, str) else sealed
        keys = sealed["bound_to"]
        rows = [
            "\x1f".join([name, *("" if v is None else str(v) for v in values)])
            for values in df[keys].itertuples(index=False)
        ]
        df[field.name] = [
            None
            if v is None
            else decrypt_batch({key_id_of(v): ref.key(key_id_of(v))}, [v], [r], field.name)[0]
            for v, r in zip(df[field.name], rows, strict=True)
        ]
    return df


def rows_by_table(lake_root: Path) -> dict[str, set]:
    """Every bronze/ops table's rows (sealed columns opened) minus the run-specific columns."""
    from ehrlake import config
    from ehrlake.security.columns import KeyRef

    security = config.load().security
    ref = dataclasses.replace(KeyRef.from_config(security), reveal_key_file=security.reveal_key_file)
    out = {}
    for log in sorted(lake_root.glob("*/*/_delta_log")):
        name = f"{log.parent.parent.name}.{log.parent.name}"
        if name == "ops.ingest_runs" or name.startswith("audit."):
            continue
        df = _opened(name, DeltaTable(str(log.parent)), ref)
        df = df.drop(
            columns=[c for c in ("ingest_run_id", "ingested_at", "quarantined_at") if c in df.columns]
        )
        out[name] = set(df.astype(str).itertuples(index=False, name=None))
    return out


def test_help_everywhere_and_one_line_errors(tmp_path):
    for args in (
        ["--help"],
        ["ingest", "--help"],
        ["lake", "show", "--help"],
        ["read", "--help"],
        ["reveal", "--help"],
        ["audit", "verify", "--help"],
    ):
        result = ehrlake(*args)
        assert result.returncode == 0 and "usage:" in result.stdout
    missing = ehrlake(
        "ingest", "--source", "fhir-ndjson", "--input", str(tmp_path / "nope"), "--lake", str(tmp_path / "l")
    )
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines()[-1]
        == f"ehrlake: error: input path {tmp_path / 'nope'} does not exist"
    )
    bad_lake = tmp_path / "file-not-dir"
    bad_lake.write_text("x")
    result = ehrlake("lake", "show", "--lake", str(bad_lake))
    assert result.returncode == 1 and "ehrlake: error:" in result.stderr


def test_every_commands_help_renders_as_written():
    """Every command's and subcommand's help formats (a stray ``%`` in a help string breaks
    ``--help``) and shows no escape left over (``%%`` in a description is printed as is)."""
    import argparse

    from ehrlake.cli import build_parser

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    parsers = list(walk(build_parser()))
    assert len(parsers) > 20
    for parser in parsers:
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, parser.prog


def test_no_java_is_a_clear_one_line_error(tmp_path):
    result = subprocess.run(
        [str(BIN / "ehrlake"), "lake", "show", "--lake", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**env(), "PATH": str(BIN), "JAVA_HOME": ""},
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "ehrlake: error: no Java runtime found: install one (Debian: apt-get install "
        "openjdk-17-jre-headless) or set JAVA_HOME"
    )


def test_third_party_noise_from_child_processes_is_kept_out_of_the_commands_stderr():
    """The JVM and Spark's Python workers inherit descriptor 2: what they print passes the filter,
    without the known native notices (XGBoost ranks, the JVM's incubator note), partial lines too."""
    child = (
        "printf '[07:10:37] Task 1 got rank 1[07:10:37] Task 0 got rank 0\\n' >&2; "
        "printf 'WARNING: Using incubator modules: jdk.incubator.vector\\nreal error\\n' >&2; "
        "printf 'passphrase: ' >&2"
    )
    code = f"from ehrlake import noise; noise.filter_stderr(); import subprocess; subprocess.run({child!r}, shell=True)"
    quiet = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env()
    )
    assert quiet.returncode == 0 and quiet.stderr == "real error\npassphrase: "
    loud = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env(), "EHRLAKE_DEBUG": "1"},
    )
    assert "got rank" in loud.stderr and "incubator" in loud.stderr and "real error" in loud.stderr


def test_the_commands_last_error_line_survives_its_exit_every_time():
    """The line a failing command prints just before it exits is copied out before the filter stops
    (it was once lost now and then on a loaded machine: exit 1, empty stderr). Many at once load it."""
    code = (
        "from ehrlake import noise; noise.filter_stderr(); import sys; "
        "print('ehrlake: error: the one line', file=sys.stderr); sys.exit(1)"
    )
    runs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env())
        for _ in range(24)
    ]
    outcomes = [(run.wait(timeout=60), run.stderr.read()) for run in runs]
    assert outcomes == [(1, "ehrlake: error: the one line\n")] * len(runs)


@pytest.fixture(scope="module")
def cli_ingested(tmp_path_factory):
    """(lake, the command's result) of one CLI ingest of the NDJSON sample, shared by the tests that
    need one: each spark-submit ingest costs a minute or two of the CI."""
    lake = tmp_path_factory.mktemp("cli") / "lake"
    return lake, ehrlake("ingest", *ndjson_ingest_args(lake))


@pytest.mark.slow
@pytest.mark.heavy
def test_cli_ingest_then_lake_show_json(cli_ingested, tmp_path):
    ingested, result = cli_ingested
    lake = tmp_path / "lake"
    shutil.copytree(ingested, lake)  # this test rotates keys: the shared lake stays as ingested
    assert result.returncode == 0, result.stderr[-2000:]
    assert "check: 6,021 records read" in result.stdout and ": OK" in result.stdout
    # quiet by default: no Spark start-up log, WARN lines, progress bars or the JVM's own notice
    # about incubator modules (ehrlake.noise)
    assert not result.stderr.strip(), result.stderr.splitlines()[:5]
    shown = ehrlake("lake", "show", "--json", "--lake", str(lake))
    assert json.loads(shown.stdout)["engine"] == "delta-rs"  # auto, for now (docs/architecture.md)
    tables = {t["name"]: t for t in json.loads(shown.stdout)["tables"]}
    assert tables["bronze.fhir_patient"]["rows"] == 109 and tables["bronze.fhir_patient"]["layer"] == "bronze"
    # SQL as a role: the engineer counts bronze patients; the analyst is refused in one line
    counted = ehrlake("sql", "SELECT count(*) AS n FROM bronze.fhir_patient", "--role", "engineer", "--json",
                      "--lake", str(lake))  # fmt: skip
    assert counted.returncode == 0 and json.loads(counted.stdout) == {"n": 109}, counted.stderr[-500:]
    refused = ehrlake("sql", "SELECT * FROM bronze.fhir_patient", "--role", "analyst", "--lake", str(lake))
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "ehrlake: error: bronze.fhir_patient may not be read by role analyst"
    )
    assert (
        tables["bronze.fhir_encounter"]["last_operation"] == "MERGE"
        and tables["ops.ingest_files"]["rows"] == 7
    )
    verified = ehrlake("audit", "verify", "--lake", str(lake))
    assert verified.returncode == 0 and "audit log OK" in verified.stdout, verified.stdout + verified.stderr
    denied = ehrlake("read", "--table", "bronze.fhir_patient", "--role", "analyst", "--lake", str(lake))
    assert denied.returncode == 1
    assert (
        denied.stderr.strip().splitlines()[-1]
        == "ehrlake: error: role analyst may not read bronze.fhir_patient"
    )
    rows = ehrlake("read", "--table", "bronze.fhir_patient", "--limit", "2", "--json", "--lake", str(lake))
    shown = [json.loads(line) for line in rows.stdout.splitlines()]
    assert len(shown) == 2 and all(r["family_name"].startswith("ek2:") and r["patient_key"] for r in shown)
    rotated = ehrlake("keys", "rotate", "--table", "bronze.fhir_patient", "--reencrypt", "--lake", str(lake))
    assert rotated.returncode == 0 and "as Delta version" in rotated.stdout, rotated.stderr[-2000:]
    refused = ehrlake(
        "keys",
        "rotate",
        "--table",
        "bronze.fhir_patient",
        "--reencrypt",
        "--role",
        "analyst",
        "--lake",
        str(lake),
    )  # re-encryption rewrites the table: a job, refused to a role that may not write bronze
    assert refused.returncode == 1 and "analyst may not write the bronze" in refused.stderr


@pytest.mark.slow
@pytest.mark.heavy
def test_two_ingests_at_once_of_the_same_patients_load_each_patient_once(tmp_path):
    """Two OS processes ingest the same 100 patients and their conditions (in files of their own)
    into one lake at the same time, twice over: every key lands once, the two run reports say so
    between them (each record inserted once, the other's copy unchanged) and the audit chain holds."""
    source = shared("fhir_ndjson_pathling", "server_import_100p")
    lake = tmp_path / "lake"
    for round_ in range(2):
        inputs = []
        for writer in "ab":
            folder = tmp_path / f"round{round_}-{writer}"
            folder.mkdir()
            for name in ("Patient.ndjson.gz", "Condition.ndjson.gz"):
                (folder / name).write_bytes((source / name).read_bytes())
            inputs.append(folder)
        procs = [
            subprocess.Popen(
                [str(BIN / "ehrlake"), "ingest", "--source", "fhir-ndjson", "--input", str(folder), "--json",
                 "--lake", str(lake)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
            )
            for folder in inputs
        ]  # fmt: skip
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
        reports = [json.loads(out) for out, _ in outs]
        for table, expected in (("bronze.fhir_patient", 100), ("bronze.fhir_condition", None)):
            ids = DeltaTable(str(lake / "bronze" / table.split(".")[1])).to_pyarrow_table(columns=["id"])
            ids = ids.column("id").to_pylist()
            assert len(ids) == len(set(ids)), f"round {round_}: {table} holds a key twice"
            assert expected is None or len(ids) == expected
            inserted = sum(e["inserted"] for r in reports for e in r["entities"] if e["entity"] == table)
            assert inserted == (len(ids) if round_ == 0 else 0), (round_, table, inserted)
    verified = ehrlake("audit", "verify", "--lake", str(lake))
    assert verified.returncode == 0 and "audit log OK" in verified.stdout, verified.stdout + verified.stderr


@pytest.mark.slow
@pytest.mark.heavy
def test_ingest_killed_mid_run_then_rerun_equals_uninterrupted_run(cli_ingested, tmp_path):
    source = shared("fhir_ndjson_pathling")
    (clean, uninterrupted), crashed = cli_ingested, tmp_path / "crashed"
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    proc = subprocess.Popen(
        [
            str(BIN / "ehrlake"),
            "ingest",
            "--source",
            "fhir-ndjson",
            "--input",
            str(source),
            "--lake",
            str(crashed),
        ],
        env=env(),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # kill as soon as the first bronze table has a data commit, while others are still to come
    deadline = time.time() + 300
    while time.time() < deadline and not list(crashed.glob("bronze/*/_delta_log/00000000000000000001.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crashed / "ops" / "ingest_files").exists(), "killed too late to test recovery"
    partial = rows_by_table(crashed)
    assert partial != rows_by_table(clean)
    rerun = ehrlake("ingest", "--source", "fhir-ndjson", "--input", str(source), "--lake", str(crashed))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rows_by_table(crashed) == rows_by_table(clean)
    # every row names a run on record: the killed one stays "running", the rerun "finished"
    runs = DeltaTable(str(crashed / "ops" / "ingest_runs")).to_pyarrow_table(columns=["run_id", "status"])
    status = dict(zip(runs.column("run_id").to_pylist(), runs.column("status").to_pylist(), strict=True))
    named = set()
    for log in crashed.glob("*/*/_delta_log"):
        table = DeltaTable(str(log.parent))
        if "ingest_run_id" in table.schema().to_arrow().names:
            named |= set(table.to_pyarrow_table(columns=["ingest_run_id"]).column(0).to_pylist())
    assert named and named <= set(status) and sorted(status.values()) == ["finished", "running"]


@pytest.mark.slow
@pytest.mark.heavy
def test_spark_submit_ingest_on_a_standalone_cluster_with_two_workers(tmp_path):
    cluster = {
        "EHRLAKE_CLUSTER_DIR": str(tmp_path / "cluster"),
        "PYTHON": PYTHON,
        "SPARK_MASTER_PORT": str(free_port()),
        "SPARK_MASTER_WEBUI_PORT": str(free_port()),
        "SPARK_WORKER_MEMORY": "1g",
    }
    start = subprocess.run(
        ["bash", "infra/standalone/start.sh", "2"],
        capture_output=True,
        text=True,
        env=env(**cluster),
        cwd=REPO,
        timeout=240,
    )
    try:
        assert start.returncode == 0, start.stderr + start.stdout
        master = start.stdout.strip().splitlines()[-1]
        lake = tmp_path / "lake"
        submit = subprocess.run(
            [
                str(BIN / "spark-submit"),
                "--master",
                master,
                "--conf",
                f"spark.pyspark.python={PYTHON}",
                "--conf",
                "spark.driver.host=127.0.0.1",
                "--conf",
                "spark.executor.memory=768m",
                "jobs/ingest.py",
                *ndjson_ingest_args(lake),
            ],
            capture_output=True,
            text=True,
            env=env(),
            cwd=REPO,
            timeout=600,
        )
        assert submit.returncode == 0, submit.stderr[-3000:]
        assert ": OK" in submit.stdout
        assert DeltaTable(str(lake / "bronze" / "fhir_patient")).to_pyarrow_table().num_rows == 109
        assert DeltaTable(str(lake / "bronze" / "fhir_encounter")).to_pyarrow_table().num_rows == 3697
        # the work really ran on the workers' executors
        assert any((tmp_path / "cluster").glob("work-*/app-*/*/stderr"))
    finally:
        subprocess.run(["bash", "infra/standalone/stop.sh"], env=env(**cluster), cwd=REPO, timeout=60)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_step_is_a_command_line_the_cli_accepts(path):
    """A shipped pipeline (the demo's among them) stops before its first step on a mistake in any
    step; this finds the mistake before a newcomer does (a note with ': ' in it once made a step
    a YAML mapping)."""
    from ehrlake import pipeline
    from ehrlake.cli import build_parser

    for step in pipeline.load(str(path)):
        build_parser().parse_args(list(step.argv))  # argparse exits on a bad line: the test fails


def test_pipeline_runs_declared_steps_in_one_session_and_stops_at_the_first_failure(
    spark, tmp_path, capsys, security_conf
):
    """``ehrlake pipeline``: each step an ehrlake command line, run in this process (the test's one
    SparkSession serves every step), the pipeline's --lake given to each; a failing step stops the
    run with one line naming it, and re-running the whole pipeline adds nothing."""
    from conftest import SAMPLE

    from ehrlake import cli

    lake = tmp_path / "lake"
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        f"steps:\n  - ingest --source fhir-ndjson --input {SAMPLE / 'fhir_ndjson'}\n  - lake maintain --json\n"
        "  - lake show --json\n"
    )
    assert cli.main(["pipeline", str(steps), "--lake", str(lake)]) == 0
    out = capsys.readouterr().out
    assert "[1/3] $ ehrlake ingest --source fhir-ndjson" in out and "[3/3] $ ehrlake lake show --json" in out
    maintained = json.loads(next(line for line in out.splitlines() if line.startswith('{"lake"')))
    files = {t["table"]: (t["files_before"], t["files_after"]) for t in maintained["tables"]}
    assert files["ops.ingest_files"][1] == 1 and "audit.events" not in files
    assert "pipeline: 3 steps in" in out and (lake / "bronze" / "fhir_patient" / "_delta_log").is_dir()
    patients = DeltaTable(str(lake / "bronze" / "fhir_patient")).to_pyarrow_table().num_rows
    assert cli.main(["pipeline", str(steps), "--lake", str(lake)]) == 0  # idempotent
    assert DeltaTable(str(lake / "bronze" / "fhir_patient")).to_pyarrow_table().num_rows == patients
    capsys.readouterr()
    steps.write_text("steps:\n  - lake show\n  - read --table bronze.nothing_here\n  - lake show\n")
    assert cli.main(["pipeline", str(steps), "--lake", str(lake)]) == 1
    captured = capsys.readouterr()
    assert "[3/3]" not in captured.out
    assert (
        captured.err.strip()
        .splitlines()[-1]
        .startswith("ehrlake: error: pipeline stopped at step 2 (read --table bronze.nothing_here)")
    )
    steps.write_text("steps:\n  - ehrlake lake show\n")
    assert cli.main(["pipeline", str(steps)]) == 1
    assert "write the command without it" in capsys.readouterr().err
    # a mistake in a later step stops the pipeline before its first step runs, in one line
    steps.write_text("steps:\n  - lake show\n  - clean --everything\n")
    assert cli.main(["pipeline", str(steps), "--lake", str(lake)]) == 1
    captured = capsys.readouterr()
    assert "[1/2]" not in captured.out and "usage:" not in captured.err
    assert captured.err.strip() == (
        f"ehrlake: error: {steps}: step 2 (clean --everything): unrecognized arguments: --everything"
    )
