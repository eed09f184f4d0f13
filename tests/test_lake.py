"""The lake layer on real Delta tables on disk: every mode, time travel, conflicts, crashes, schema."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import CommitConflict, ConfigError, SchemaMismatch, TableNotFound
from ehrlake.lake import WriteMode
from ehrlake.lake._delta_rs import _add_actions
from ehrlake.security.audit import Event

SCHEMA = T.StructType(
    [
        T.StructField("id", T.StringType()),
        T.StructField("region", T.StringType()),
        T.StructField("n", T.LongType()),
        T.StructField("seen", T.TimestampType()),
        T.StructField("tags", T.ArrayType(T.StringType())),
    ]
)


@pytest.fixture(params=["delta-rs", "native"])
def lake(request, spark, tmp_path, security_conf):
    """The lake-layer contract holds on both commit engines (native: Delta Lake's own, from the JARs
    `make setup` fetches; skipped where they are absent)."""
    from ehrlake import config
    from ehrlake.lake import Lake, _native
    from ehrlake.security import Security

    if request.param == "native" and not _native.available(spark):
        pytest.skip("Delta Lake JARs not on Spark's class path (make setup fetches them)")
    root = str(tmp_path / "lake")
    security = Security.from_config(config.load(security_conf).security, root)
    return Lake(root, spark, request.param, security)


def rows(spark, data):
    return spark.createDataFrame(data, SCHEMA)


def as_set(df):
    return {tuple(r) if not isinstance(r[4], list) else (*r[:4], tuple(r[4])) for r in df.collect()}


def sample(spark):
    return rows(
        spark,
        [
            ("a", "KA", 1, dt.datetime(2020, 1, 1), ["x"]),
            ("b", "MH", 2, dt.datetime(2021, 6, 1), []),
            ("c", "KA", 3, None, None),
        ],
    )


def test_append_then_read_back_identically_with_deltalake_reader(lake, spark):
    result = lake.write(sample(spark), "bronze.things", partition_by=["region"])
    assert result.rows_written == 3 and result.version == 1
    via_spark = lake.read("bronze.things").orderBy("id").toPandas()
    via_rs = DeltaTable(lake.path("bronze.things")).to_pandas().sort_values("id").reset_index(drop=True)
    assert list(via_rs.columns) == list(via_spark.columns)
    assert via_rs["id"].tolist() == via_spark["id"].tolist() == ["a", "b", "c"]
    assert via_rs["n"].tolist() == via_spark["n"].tolist() == [1, 2, 3]
    assert via_rs["region"].tolist() == ["KA", "MH", "KA"]
    assert via_rs["seen"].dt.tz_convert(None).tolist()[:2] == [
        dt.datetime(2020, 1, 1),
        dt.datetime(2021, 6, 1),
    ]
    assert [list(t) if t is not None else None for t in via_rs["tags"]] == [["x"], [], None]


def test_add_actions_carry_file_statistics(lake, spark):
    lake.write(sample(spark), "bronze.things")
    log = Path(lake.path("bronze.things"), "_delta_log")
    adds = [
        json.loads(line)["add"]
        for f in sorted(log.glob("*.json"))
        for line in f.read_text().splitlines()
        if '"add"' in line
    ]
    stats = [json.loads(a["stats"]) for a in adds]
    assert sum(s["numRecords"] for s in stats) == 3
    merged_min = min(s["minValues"]["n"] for s in stats)
    merged_max = max(s["maxValues"]["n"] for s in stats)
    assert merged_min == 1 and merged_max == 3
    # text columns carry no statistics: a min or max would copy input text out of its row
    assert not any("id" in s["minValues"] or "region" in s["maxValues"] for s in stats)
    assert sum(s["nullCount"]["seen"] for s in stats) == 1
    # delta-rs uses the stats: a predicate on n skips files whose range excludes it
    assert DeltaTable(lake.path("bronze.things")).to_pyarrow_table(filters=[("n", ">", 2)]).num_rows >= 1


def test_overwrite_whole_table_and_time_travel(lake, spark):
    lake.write(sample(spark), "bronze.things")
    before = dt.datetime.now()
    time.sleep(1.1)
    lake.write(rows(spark, [("z", "DL", 9, None, None)]), "bronze.things", mode=WriteMode.OVERWRITE)
    assert [r.id for r in lake.read("bronze.things").collect()] == ["z"]
    assert sorted(r.id for r in lake.read("bronze.things", version=1).collect()) == ["a", "b", "c"]
    assert sorted(r.id for r in lake.read("bronze.things", timestamp=before).collect()) == ["a", "b", "c"]
    history = lake.history("bronze.things")
    assert [h["version"] for h in history] == [2, 1, 0]
    assert history[0]["ehrlakeOperation"] == "OVERWRITE"


def test_native_overwrite_of_an_empty_table_is_an_append_unless_a_writer_came_between(
    lake, spark, monkeypatch
):
    """The native engine writes an overwrite of a table without files as an append (no state
    reconstruction); when another commit lands between its look and its append, it overwrites again."""
    if lake.engine.name != "native":
        pytest.skip("the native engine's shortcut")
    from ehrlake.lake import _native

    first = lake.write(sample(spark), "bronze.things", mode=WriteMode.OVERWRITE)
    assert first.operation == "OVERWRITE" and first.rows_written == 3
    assert lake.history("bronze.things")[0]["operationParameters"]["mode"] == "Append"
    # the look saw the table empty at version 0, but a writer's three rows landed at version 1 since
    monkeypatch.setattr(_native, "_empty_version", lambda path: 0)
    late = lake.write(rows(spark, [("z", "DL", 9, None, None)]), "bronze.things", mode=WriteMode.OVERWRITE)
    assert [r.id for r in lake.read("bronze.things").collect()] == ["z"]
    assert (
        late.version == 3 and lake.history("bronze.things")[0]["operationParameters"]["mode"] == "Overwrite"
    )


def test_native_merge_into_an_empty_table_inserts_and_catches_up_with_a_writer_between(
    lake, spark, monkeypatch
):
    """A merge into a table without files is an insert-only MERGE (its source read once); when a
    writer's rows landed between the look and the merge, a full MERGE of the same rows follows."""
    if lake.engine.name != "native":
        pytest.skip("the native engine's shortcut")
    from ehrlake.lake import _native

    lake.create("bronze.things", SCHEMA)
    first = lake.merge(sample(spark), "bronze.things", keys=["id"])
    assert first.metrics == {"inserted": 3, "updated": 0, "unchanged": 0, "deleted": 0}
    assert lake.history("bronze.things")[0]["operationParameters"]["matchedPredicates"] == "[]"
    # the look saw the table empty at version 0; since then a writer's three rows landed
    monkeypatch.setattr(_native, "_empty_version", lambda path: 0)
    changed = [
        ("a", "KA", 100, None, None),
        ("b", "MH", 2, dt.datetime(2021, 6, 1), []),
        ("d", "DL", 4, None, None),
    ]
    late = lake.merge(rows(spark, changed), "bronze.things", keys=["id"], update_when="s.n <> t.n")
    assert late.metrics == {"inserted": 1, "updated": 1, "unchanged": 1, "deleted": 0}
    found = sorted((r.id, r.n) for r in lake.read("bronze.things").collect())
    assert found == [("a", 100), ("b", 2), ("c", 3), ("d", 4)]


def test_overwrite_one_partition_keeps_the_others(lake, spark):
    lake.write(sample(spark), "bronze.things", partition_by=["region"])
    lake.write(
        rows(spark, [("k", "KA", 7, None, None)]),
        "bronze.things",
        mode=WriteMode.OVERWRITE,
        where={"region": "KA"},
    )
    assert sorted((r.id, r.region) for r in lake.read("bronze.things").collect()) == [
        ("b", "MH"),
        ("k", "KA"),
    ]


def test_partition_overwrite_refuses_rows_of_other_partitions(lake, spark):
    lake.write(sample(spark), "bronze.things", partition_by=["region"])
    with pytest.raises(SchemaMismatch, match="outside the partition"):
        lake.write(sample(spark), "bronze.things", mode=WriteMode.OVERWRITE, where={"region": "KA"})
    assert lake.row_count("bronze.things") == 3


def test_merge_updates_matched_inserts_new_and_counts(lake, spark):
    lake.write(sample(spark), "bronze.things", partition_by=["region"])
    update = rows(
        spark, [("a", "KA", 10, None, ["y"]), ("b", "MH", 1, None, None), ("d", "MH", 4, None, None)]
    )
    result = lake.merge(update, "bronze.things", keys=["id"], update_when="s.n > t.n")
    assert result.metrics == {"inserted": 1, "updated": 1, "unchanged": 1, "deleted": 0}
    got = {r.id: r.n for r in lake.read("bronze.things").collect()}
    assert got == {"a": 10, "b": 2, "c": 3, "d": 4}
    # merging the same rows again changes nothing
    again = lake.merge(update, "bronze.things", keys=["id"], update_when="s.n > t.n")
    assert again.metrics == {"inserted": 0, "updated": 0, "unchanged": 3, "deleted": 0}
    assert lake.row_count("bronze.things") == 4


def test_merge_deletes_in_the_same_commit_and_rewrites_only_files_it_changes(lake, spark):
    """An incremental job's replace: upserts and deletions in one commit (one version, both or
    neither), and a file holding no row to change is not rewritten."""
    lake.write(sample(spark), "silver.things", partition_by=["region"])  # files: KA (a, c), MH (b)
    before = lake.version("silver.things")
    files = {a["path"] for a in _add_actions(DeltaTable(lake.path("silver.things")))}
    update = rows(spark, [("a", "KA", 10, None, None), ("d", "DL", 4, None, None)])
    gone = spark.createDataFrame([("c",)], "id string")
    result = lake.merge(update, "silver.things", keys=["id"], update_when="NOT (t.n <=> s.n)", delete=gone)
    assert result.version == before + 1
    assert result.metrics == {"inserted": 1, "updated": 1, "unchanged": 0, "deleted": 1}
    assert {r.id: r.n for r in lake.read("silver.things").collect()} == {"a": 10, "b": 2, "d": 4}
    after = {a["path"] for a in _add_actions(DeltaTable(lake.path("silver.things")))}
    assert [f for f in files if "MH" in f] == [f for f in after if "MH" in f], "b's file was rewritten"
    # the rows of files added or removed since `before`: a, c (old KA file), a (new), d; never b
    changed = lake.changed_rows("silver.things", before, ["id", "n"])
    assert sorted(tuple(r) for r in changed.collect()) == [("a", 1), ("a", 10), ("c", 3), ("d", 4)]
    assert lake.changed_rows("silver.things", result.version, ["id"]).count() == 0
    # the files added only: rows of the table as it is now (a's old row and c are gone)
    added = lake.changed_rows("silver.things", before, ["id", "n"], added_only=True)
    assert sorted(tuple(r) for r in added.collect()) == [("a", 10), ("d", 4)]


def test_changed_rows_is_none_once_the_removed_files_are_vacuumed(lake, spark):
    lake.write(sample(spark), "bronze.things")
    first = lake.version("bronze.things")
    lake.write(rows(spark, [("z", "DL", 9, None, None)]), "bronze.things", mode=WriteMode.OVERWRITE)
    assert lake.changed_rows("bronze.things", first, ["id"]).count() == 4  # a, b, c went; z came
    lake.vacuum("bronze.things", retention_hours=0)
    assert lake.changed_rows("bronze.things", first, ["id"]) is None


def test_vacuum_removes_files_of_old_versions_but_keeps_current(lake, spark):
    lake.write(sample(spark), "bronze.things")
    lake.write(rows(spark, [("z", "DL", 9, None, None)]), "bronze.things", mode=WriteMode.OVERWRITE)
    removed = lake.vacuum("bronze.things", retention_hours=0)
    assert removed, "the overwritten files should be vacuumed"
    assert [r.id for r in lake.read("bronze.things").collect()] == ["z"]


def test_maintain_compacts_sets_retention_and_leaves_rows_history_and_audit_as_they_were(lake, spark):
    """``ehrlake lake maintain``: many small appends become one file, no row changes at any version,
    retention is a table property any Delta reader sees, the audit log is neither rewritten nor
    vacuumed (and still verifies), and a second run has nothing to do."""
    from ehrlake.lake.maintenance import maintain

    for i in range(4):
        lake.write(rows(spark, [(f"p{i}", "KA", i, None, [f"t{i}"])]), "bronze.things")
    lake.write(sample(spark), "silver.things", mode=WriteMode.OVERWRITE)
    lake.write(rows(spark, [("z", "DL", 9, None, None)]), "silver.things")
    for i in range(2):  # a deep-learning table: its files are the training workers' shards
        lake.write(rows(spark, [(f"x{i}", "KA", i, None, None)]), "gold.tensors_task")
    before = {t: as_set(lake.read(t)) for t in ("bronze.things", "silver.things", "gold.tensors_task")}
    version = lake.version("bronze.things")
    lake.security.audit.record(Event("read", role="analyst", table_name="bronze.things"))
    audit_version = lake.version("audit.events")

    done = {m.table: m for m in maintain(lake, retain_days=1, zorder=["n", "region"], role="engineer")}
    assert set(done) == set(before)  # audit.events is not maintained
    assert done["gold.tensors_task"].files_after == done["gold.tensors_task"].files_before == 2
    assert done["silver.things"].zordered == ["n"]  # text without statistics cannot order files
    assert done["bronze.things"].files_before >= 4 and done["bronze.things"].files_after == 1
    assert done["bronze.things"].compacted == done["bronze.things"].files_before
    assert done["bronze.things"].vacuumed == 0  # the compacted files are younger than a day
    for table, content in before.items():
        assert as_set(lake.read(table)) == content
    assert as_set(lake.read("bronze.things", version=version)) == before["bronze.things"]  # time travel
    assert DeltaTable(lake.path("bronze.things")).metadata().configuration.items() >= {
        ("delta.deletedFileRetentionDuration", "interval 1 days"),
        ("delta.logRetentionDuration", "interval 30 days"),
    }
    assert lake.history("bronze.things", 1)[0]["operation"] == "OPTIMIZE"
    assert lake.version("audit.events") > audit_version  # the job's own audit events, appended
    assert lake.security.audit.verify(lake).first_broken is None
    maintained = [e for e in lake.read("audit.events").where("action = 'maintain'").collect()]
    assert [(e.role, e.outcome) for e in maintained] == [("engineer", "allowed")]

    versions = {t: lake.version(t) for t in before}
    again = maintain(lake, retain_days=1, role="engineer")
    assert all(m.compacted == 0 and m.files_after == m.files_before for m in again)
    assert {t: lake.version(t) for t in before} == versions  # nothing to do is no commit
    with pytest.raises(ConfigError, match="retain-days"):
        maintain(lake, retain_days=0, role="engineer")


def in_threads(writer, tags: str = "pq") -> list[str]:
    """Run ``writer(tag)`` for each tag at once; the errors they raised, as text for the test's
    assertion to show (an exception's repr alone hides Spark's message)."""
    errors: list[str] = []

    def run(tag):
        try:
            writer(tag)
        except Exception as exc:  # surfaced through the caller's assertion
            errors.append(f"{type(exc).__name__}: {str(exc)[:1000]}")

    threads = [threading.Thread(target=run, args=(t,)) for t in tags]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return errors


def test_merges_into_two_tables_at_once_each_commit_their_own_information(lake, spark):
    """Ingest loads its tables side by side: two merges at once in one process, each commit carries
    its own writer's information (the native engine gives each MERGE its own session settings)."""
    for tag in "pq":
        lake.write(sample(spark), f"bronze.things_{tag}")

    def writer(tag):
        changed = rows(spark, [(f"{tag}{i}", "KA", i, None, None) for i in range(50)])
        lake.merge(changed, f"bronze.things_{tag}", keys=["id"], commit_info={"ehrlakeJob": f"job-{tag}"})

    assert not in_threads(writer)
    for tag in "pq":
        latest = lake.history(f"bronze.things_{tag}")[0]
        assert (latest["ehrlakeOperation"], latest["ehrlakeJob"]) == ("MERGE", f"job-{tag}")
        assert lake.read(f"bronze.things_{tag}").count() == 53


def test_concurrent_appends_from_threads_all_survive(lake, spark):
    lake.create("bronze.things", SCHEMA)

    def writer(tag):
        for i in range(3):
            lake.write(rows(spark, [(f"{tag}{i}", "KA", i, None, None)]), "bronze.things")

    assert not in_threads(writer)
    assert sorted(r.id for r in lake.read("bronze.things").collect()) == ["p0", "p1", "p2", "q0", "q1", "q2"]
    assert lake.version("bronze.things") == 6


@pytest.mark.parametrize("fresh_table", [True, False], ids=["first-write", "existing-table"])
def test_concurrent_merges_of_the_same_keys_never_duplicate_a_key(lake, spark, fresh_table):
    """Two writers merge overlapping keys at once (as two ingests of the same patients do): every
    key ends up once, and between them the writers report each key inserted exactly once."""
    if not fresh_table:
        lake.write(sample(spark), "bronze.things")
    for round_ in range(3):
        shared_keys = [(f"s{round_}-{i}", "KA", i, None, None) for i in range(20)]
        results = {}

        def writer(tag, shared_keys=shared_keys, results=results, round_=round_):
            own = [(f"{tag}{round_}-{i}", "MH", i, None, None) for i in range(5)]
            results[tag] = lake.merge(rows(spark, shared_keys + own), "bronze.things", keys=["id"])

        assert not in_threads(writer)
        ids = [r.id for r in lake.read("bronze.things").collect()]
        assert len(ids) == len(set(ids)), f"round {round_}: a key was written twice"
        inserted = sum(r.metrics["inserted"] for r in results.values())
        assert inserted == 20 + 2 * 5, f"round {round_}: {[r.metrics for r in results.values()]}"


ROWS_SCHEMA = "job string, part string, n long, cuts array<double>, at timestamp"


def test_merge_rows_upserts_what_the_driver_holds_as_a_spark_merge_would(lake, spark):
    """A job's bookkeeping rows (a watermark, drift figures) merged from the driver: the table is
    created, matched keys (a null key too) updated, new ones inserted, a new column added only when
    asked; Spark reads back the values given, timestamps included, and the commit says who wrote it."""
    at = dt.datetime(2026, 12, 7, 13, 45, 1, 123456)
    first = [("clean", "silver.a", 1, [0.5, 1.5], at), ("clean", None, 2, [], None)]
    result = lake.merge_rows(
        first, ROWS_SCHEMA, "ops.marks", ["job", "part"], commit_info={"ehrlakeJob": "t"}
    )
    assert (result.operation, result.metrics["inserted"], result.metrics["updated"]) == ("MERGE", 2, 0)
    latest = lake.history("ops.marks", limit=1)[0]
    assert (latest["ehrlakeOperation"], latest["ehrlakeJob"]) == ("MERGE", "t")
    later = at + dt.timedelta(days=1)
    again = [("clean", None, 3, [2.0], later), ("score", "gold.b", 4, None, later)]
    result = lake.merge_rows(again, ROWS_SCHEMA, "ops.marks", ["job", "part"])
    assert (result.metrics["inserted"], result.metrics["updated"]) == (1, 1)
    got = {(r.job, r.part): (r.n, r.cuts, r.at) for r in lake.read("ops.marks").collect()}
    assert got == {
        ("clean", "silver.a"): (1, [0.5, 1.5], at),
        ("clean", None): (3, [2.0], later),
        ("score", "gold.b"): (4, None, later),
    }
    wider = ROWS_SCHEMA + ", note string"
    with pytest.raises(SchemaMismatch, match="note"):
        lake.merge_rows([("clean", "silver.a", 5, None, at, "x")], wider, "ops.marks", ["job", "part"])
    lake.merge_rows([("clean", "silver.a", 5, None, at, "x")], wider, "ops.marks", ["job", "part"], True)
    noted = {(r.job, r.part): (r.n, r.note) for r in lake.read("ops.marks").collect()}
    assert noted == {
        ("clean", "silver.a"): (5, "x"),
        ("clean", None): (3, None),
        ("score", "gold.b"): (4, None),
    }


def test_concurrent_merge_rows_of_the_same_keys_never_duplicate_a_key(lake):
    """Two jobs recording their marks at once: each key ends up once, with one writer's row."""
    at = dt.datetime(2026, 12, 7)
    for round_ in range(3):

        def writer(tag, round_=round_):
            marks = [("score", f"t{i}", round_, None, at) for i in range(3)] + [
                (tag, "own", round_, None, at)
            ]
            lake.merge_rows(marks, ROWS_SCHEMA, "ops.marks", ["job", "part"])

        assert not in_threads(writer)
        keys = [(r.job, r.part) for r in lake.read("ops.marks").collect()]
        assert len(keys) == len(set(keys)) == 5, f"round {round_}: {sorted(keys)}"


def test_conflicting_commit_from_a_stale_snapshot_fails_loudly_and_loses_nothing(lake, spark):
    """Two merges planned against the same version both rewrite the same file: one must lose."""
    if lake.engine.name != "delta-rs":
        pytest.skip("the delta-rs engine's own commit protocol; Delta's own refuses such a commit itself")
    lake.write(sample(spark), "bronze.things")
    engine = lake.engine
    path = lake.path("bronze.things")
    stale = DeltaTable(path)  # writer 2's snapshot, taken before writer 1 commits
    lake.merge(rows(spark, [("a", "KA", 100, None, None)]), "bronze.things", keys=["id"])
    # writer 2 now commits a removal of the file writer 1 already rewrote
    removes = engine._removes_for(stale, _add_actions(stale))
    with pytest.raises(CommitConflict, match="conflicting change"):
        engine._commit(stale, path, "bronze.things", [], removes, "append", None, "MERGE", {})
    got = {r.id: r.n for r in lake.read("bronze.things").collect()}
    assert got == {"a": 100, "b": 2, "c": 3}


KILLED_WRITER = """
import os, signal, sys
from ehrlake.config import Config, SparkConfig
from ehrlake.session import get_spark
from ehrlake.lake import Lake
spark = get_spark(Config(spark=SparkConfig(master="local[1]")))
lake = Lake(sys.argv[1], spark)
df = spark.createDataFrame([("x", "KA", 1, None, None)], lake.schema("bronze.things"))
engine = lake.engine
dt_, aligned = engine._prepare(df, lake.path("bronze.things"), "bronze.things", False)
adds = engine._stage(aligned, lake.path("bronze.things"), [])
print("STAGED", len(adds), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_writer_killed_after_writing_files_before_commit_leaves_table_unchanged(lake, spark, tmp_path):
    lake.write(sample(spark), "bronze.things")
    version, before = lake.version("bronze.things"), as_set(lake.read("bronze.things"))
    files_before = set(Path(lake.path("bronze.things")).rglob("*.parquet"))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, lake.root],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )
    assert proc.returncode == -9 and "STAGED 1" in proc.stdout, proc.stderr[-2000:]
    orphans = set(Path(lake.path("bronze.things")).rglob("*.parquet")) - files_before
    assert len(orphans) == 1, "the killed writer placed its file in the table directory"
    assert lake.version("bronze.things") == version
    assert as_set(lake.read("bronze.things")) == before
    assert DeltaTable(lake.path("bronze.things")).to_pyarrow_table().num_rows == 3
    lake.vacuum("bronze.things", retention_hours=0)
    assert not any(p.exists() for p in orphans)


def test_new_nullable_column_is_added_when_asked(lake, spark):
    lake.write(sample(spark), "bronze.things")
    wider = sample(spark).withColumn("note", F.lit("hello"))
    lake.write(wider, "bronze.things", evolve_schema=True)
    df = lake.read("bronze.things")
    assert "note" in df.columns
    assert df.where("note IS NULL").count() == 3 and df.where("note = 'hello'").count() == 3
    assert "note" in DeltaTable(lake.path("bronze.things")).schema().to_arrow().names


def test_schema_mismatch_fails_with_a_clear_message(lake, spark):
    lake.write(sample(spark), "bronze.things")
    with pytest.raises(SchemaMismatch, match="new columns note .*evolve_schema=True"):
        lake.write(sample(spark).withColumn("note", F.lit("x")), "bronze.things")
    with pytest.raises(SchemaMismatch, match=r"column types differ: n \(string vs table bigint\)"):
        lake.write(sample(spark).withColumn("n", F.col("n").cast("string")), "bronze.things")
    assert lake.version("bronze.things") == 1


def test_missing_columns_are_written_as_nulls(lake, spark):
    lake.write(sample(spark), "bronze.things")
    lake.write(sample(spark).select("id", "region"), "bronze.things")
    assert lake.read("bronze.things").where("n IS NULL").count() == 3


def test_bad_names_and_missing_tables_are_clear_errors(lake, spark):
    with pytest.raises(ConfigError, match="<layer>.<table>"):
        lake.read("nolayer")
    with pytest.raises(TableNotFound):
        lake.read("silver.absent")


def test_catalog_lists_tables_with_version_rows_and_last_operation(lake, spark):
    lake.write(sample(spark), "bronze.things")
    lake.merge(rows(spark, [("a", "KA", 5, None, None)]), "bronze.things", keys=["id"])
    lake.create("gold.empty", SCHEMA)
    infos = {t.name: t for t in lake.tables()}
    assert set(infos) == {"bronze.things", "gold.empty"}
    assert infos["bronze.things"].version == 2 and infos["bronze.things"].rows == 3
    assert infos["bronze.things"].last_operation == "MERGE"
    assert infos["gold.empty"].rows == 0 and infos["gold.empty"].layer == "gold"


def test_each_engine_is_the_one_asked_for(lake, request):
    assert lake.engine.name == request.node.callspec.params["lake"]


def test_a_table_written_by_one_engine_reads_back_equal_through_the_other(spark, tmp_path):
    """Both engines write standard Delta: rows, partitions, field metadata (which says what is
    sealed) and history cross over, whichever engine wrote the table and whichever appends next."""
    from ehrlake.lake import Lake, _native

    if not _native.available(spark):
        pytest.skip("Delta Lake JARs not on Spark's class path (make setup fetches them)")
    tagged = T.StructType(
        [
            T.StructField(f.name, f.dataType, True, {"ehrlake.sealed": "x"} if f.name == "id" else {})
            for f in SCHEMA
        ]
    )
    for first, second in (("native", "delta-rs"), ("delta-rs", "native")):
        root = str(tmp_path / first)
        writer, reader = Lake(root, spark, first), Lake(root, spark, second)
        writer.write(
            spark.createDataFrame(sample(spark).rdd, tagged), "bronze.things", partition_by=["region"]
        )
        reader.write(rows(spark, [("d", "MH", 4, None, ["y"])]), "bronze.things")
        reader.merge(rows(spark, [("a", "KA", 10, None, None)]), "bronze.things", keys=["id"])
        for lake in (writer, reader):
            assert as_set(lake.read("bronze.things")) == {
                ("a", "KA", 10, None, None),
                ("b", "MH", 2, dt.datetime(2021, 6, 1), ()),
                ("c", "KA", 3, None, None),
                ("d", "MH", 4, None, ("y",)),
            }, f"written by {first}, then {second}; read by {lake.engine.name}"
            assert lake.schema("bronze.things")["id"].metadata == {"ehrlake.sealed": "x"}
            assert [h["version"] for h in lake.history("bronze.things")] == [3, 2, 1, 0]
        assert DeltaTable(writer.path("bronze.things")).metadata().partition_columns == ["region"]


@pytest.mark.slow
@pytest.mark.heavy
def test_ingest_clean_quality_eda_give_the_same_tables_on_both_engines(spark, tmp_path, security_conf):
    """The pipeline end to end on each engine (bundled NDJSON sample, in two batches, the second
    cleaned incrementally and the result checked against a rebuild): every table has the same rows,
    and a re-ingest adds nothing on either."""
    from conftest import SAMPLE

    from ehrlake import clean, config, ingest, quality
    from ehrlake.eda import aggregates
    from ehrlake.ingest import SourceKind
    from ehrlake.lake import Lake, _native
    from ehrlake.security import Security

    if not _native.available(spark):
        pytest.skip("Delta Lake JARs not on Spark's class path (make setup fetches them)")
    today = dt.date(2026, 11, 24)
    # the second batch: nine patients and their conditions, whose observations came first
    batches, sample = tmp_path / "batches", SAMPLE / "fhir_ndjson"
    for batch, files in (
        (
            "first",
            [*(sample / "server_import_100p").iterdir(), sample / "encoders_r4_9p" / "Observation.ndjson.gz"],
        ),
        ("second", [sample / "encoders_r4_9p" / n for n in ("Patient.ndjson.gz", "Condition.ndjson.gz")]),
    ):
        (batches / batch).mkdir(parents=True)
        for file in files:
            shutil.copy(file, batches / batch / file.name)
    counts = {}
    for engine in ("delta-rs", "native"):
        root = str(tmp_path / engine)
        lake = Lake(root, spark, engine, Security.from_config(config.load(security_conf).security, root))
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(batches / "first"))
        clean.run(lake, today=today)
        report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(batches / "second"))
        again = ingest.run(lake, SourceKind.FHIR_NDJSON, str(batches / "second"))
        assert report.balanced and report.total.inserted > 0 and again.total.inserted == 0
        merged = clean.run(lake, today=today, incremental=True, rebuild_share=1.0)
        assert merged.how["patient"].startswith("merged +9 ") and "rebuilt" not in merged.how.values()
        silver = {
            t.name: sorted(map(str, lake.read(t.name).collect()))
            for t in lake.tables()
            if t.layer == "silver"
        }
        clean.run(lake, today=today)
        assert {t: sorted(map(str, lake.read(t).collect())) for t in silver} == silver, engine
        quality.run(lake, today=today)
        aggregates.run(lake, k=11, years=5, top=5, reference=today)
        counts[engine] = {
            t.name: lake.row_count(t.name) for t in lake.tables() if not t.name.startswith(("audit.", "ops."))
        }
    assert counts["native"] == counts["delta-rs"] and len(counts["native"]) >= 15


def test_lake_tables_are_known_by_name_in_sql_and_spark_table(lake, spark):
    """The session's catalog (infra/spark) finds `layer.table` in the lake opened for SQL (lake.open
    does it), without registering anything: a table written after is there at once; time travel,
    history and listings work by name; an unknown name is Spark's own error. A lake merely built
    beside it (evaluate's scratch lake) leaves the catalog where it was."""
    from ehrlake.lake import Lake
    from ehrlake.session import LAKE_CATALOG

    if spark.conf.get("spark.sql.catalog.spark_catalog", "") != LAKE_CATALOG:
        pytest.skip("the lake catalog's JAR is not on Spark's class path (make setup builds it)")
    lake.use_in_sql()
    lake.write(sample(spark), "silver.things")
    Lake(lake.root + "-scratch", spark).write(rows(spark, [("z", "KA", 9, None, None)]), "silver.things")
    assert as_set(spark.table("silver.things")) == as_set(sample(spark))
    lake.merge(rows(spark, [("a", "KA", 5, None, None)]), "silver.things", keys=["id"])
    assert spark.sql("SELECT n FROM silver.things WHERE id = 'a'").first().n == 5
    assert spark.sql("SELECT n FROM silver.things VERSION AS OF 1 WHERE id = 'a'").first().n == 1
    assert spark.sql("DESCRIBE HISTORY silver.things").count() == lake.version("silver.things") + 1
    lake.write(sample(spark), "gold.later")
    assert spark.sql("SELECT count(*) AS n FROM gold.later").first().n == 3
    assert [r.tableName for r in spark.sql("SHOW TABLES IN silver").collect()] == ["things"]
    assert spark.catalog.tableExists("silver.things") and not spark.catalog.tableExists("silver.nope")
    with pytest.raises(Exception, match="TABLE_OR_VIEW_NOT_FOUND"):
        spark.sql("SELECT * FROM silver.nope")


def test_the_lake_catalog_knows_the_same_layers_as_the_lake():
    from ehrlake.home import HOME
    from ehrlake.lake import LAYERS

    java = (HOME / "infra" / "spark" / "src" / "ehrlake" / "LakeCatalog.java").read_text()
    assert f"Arrays.asList({', '.join(json.dumps(layer) for layer in LAYERS)})" in java


def test_a_job_fingerprint_changes_with_the_code_that_derives_its_rows(tmp_path, monkeypatch):
    """An upgrade that changes how rows are derived must rebuild, not merge new rows beside old."""
    import importlib

    from ehrlake.lake import watermarks

    package = tmp_path / "derivation"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text("FLAG = 'after_death'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("derivation")
    before = watermarks.code(module)
    assert watermarks.code(module) == before
    (package / "rules.py").write_text("FLAG = 'after_death_or_burial'\n")
    assert watermarks.code(module) != before


def test_watermarks_of_an_older_lake_gain_the_counts_column(lake):
    """A lake whose ``ops.watermarks`` predates the counts keeps its marks and gains the column on
    the next record; a mark without counts reads as None (the job then counts its table)."""
    from ehrlake.lake import watermarks

    old = "job string, table string, sources string, fingerprint string, run_id string, recorded_at timestamp"
    now = dt.datetime(2026, 12, 1)
    lake.write(
        lake.spark.createDataFrame(
            [("clean", "silver.patient", '{"bronze.fhir_patient": 3}', "f", "r1", now)], old
        ),
        watermarks.TABLE,
    )
    assert watermarks.read(lake, "clean")["silver.patient"].counts is None
    counts = watermarks.Counts(version=4, rows=120, tallies={"flagged": 7})
    mark = watermarks.Watermark("clean", "silver.encounter", {"bronze.fhir_encounter": 2}, "f", "r2", counts)
    watermarks.record(lake, [mark], {})
    marks = watermarks.read(lake, "clean")
    assert marks["silver.encounter"] == mark and marks["silver.patient"].sources == {"bronze.fhir_patient": 3}
    assert marks["silver.patient"].counts is None
