"""The audit log's hash chain, signed checkpoints and witness catch each kind of tampering."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from ehrlake.security.audit import DENIED, Event


@pytest.fixture
def audit(lake):
    """A log of 9 events with a signed checkpoint after event 4 (seq 5) and at the end (seq 11)."""
    log = lake.security.audit
    log.record(*[Event("read", role="analyst", table_name=f"silver.t{i}") for i in range(1, 3)])
    log.record(Event("read", role="analyst", table_name="silver.t3"))
    log.record(
        Event("read", role="analyst", table_name="bronze.fhir_patient", outcome=DENIED), checkpoint=True
    )
    for i in range(6, 11):
        log.record(Event("write", role="engineer", job="ingest", table_name=f"bronze.t{i}", run_id="r1"))
    log.record(checkpoint=True)
    return log


def _file_with(path: str, seq: int) -> str:
    for uri in DeltaTable(path).file_uris():
        local = uri.removeprefix("file://")
        if seq in pq.read_table(local, columns=["seq"]).column("seq").to_pylist():
            return local
    raise AssertionError(f"no data file holds seq {seq}")


def _rewrite_in_place(path: str, seq: int, column: str, value) -> None:
    """What an attacker with write access to the files does: change a value, keep the Delta log."""
    local = _file_with(path, seq)
    table = pq.read_table(local)
    mask = pc.equal(table.column("seq"), seq)
    column_index = table.schema.get_field_index(column)
    replaced = pc.if_else(mask, value, table.column(column))
    pq.write_table(
        table.set_column(column_index, column, replaced.cast(table.schema.field(column).type)), local
    )


def test_untouched_log_verifies_with_chain_and_signed_checkpoints(spark, audit):
    report = audit.verify(spark)
    assert report.ok, report.format()
    assert (report.events, report.checkpoints, report.last_seq) == (11, 2, 11)
    rows = {r.seq: r for r in spark.read.parquet(*[u for u in DeltaTable(audit.path).file_uris()]).collect()}
    assert rows[1].prev_hash == "0" * 64 and rows[2].prev_hash == rows[1].hash
    assert rows[4].outcome == "denied" and rows[5].action == "checkpoint" and rows[5].signature


def test_editing_one_field_of_one_event_is_detected(spark, audit):
    _rewrite_in_place(audit.path, 4, "outcome", "allowed")  # hide a denied access
    report = audit.verify(spark)
    assert not report.ok and report.first_broken == 4 and "edited" in report.reason


def test_deleting_an_event_is_detected(spark, audit):
    DeltaTable(audit.path).delete("seq = 7")
    report = audit.verify(spark)
    assert not report.ok and report.first_broken == 7 and "deleted" in report.reason
    assert any("DELETE" in p for p in report.problems)  # the Delta history shows it too


def test_reordering_two_events_is_detected(spark, audit):
    _rewrite_in_place(audit.path, 7, "seq", 99)
    _rewrite_in_place(audit.path, 8, "seq", 7)
    _rewrite_in_place(audit.path, 99, "seq", 8)
    report = audit.verify(spark)
    assert not report.ok and report.first_broken == 7


def test_truncating_the_tail_after_a_checkpoint_is_detected_by_the_witness(spark, audit):
    log_dir = Path(audit.path) / "_delta_log"
    commits = sorted(log_dir.glob("*.json"))
    # Roll the table back to just after the first checkpoint (seq 5): delete every later commit.
    # The chain that remains is intact and every commit left is an append; only the witness knows.
    for commit in commits[4:]:
        os.remove(commit)
    assert DeltaTable(audit.path).to_pyarrow_table(columns=["seq"]).num_rows == 5
    report = audit.verify(spark)
    assert not report.ok and "truncated" in report.reason and report.first_broken == 6


def test_a_forged_checkpoint_signature_is_detected(spark, audit):
    _rewrite_in_place(audit.path, 5, "signature", "AAAA" + "B" * 84)
    report = audit.verify(spark)
    assert not report.ok and report.first_broken == 5 and "signature" in report.reason


def test_concurrent_writers_never_fork_the_chain(spark, lake):
    from concurrent.futures import ThreadPoolExecutor

    log = lake.security.audit
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: log.record(Event("read", role="analyst", detail=str(i))), range(12)))
    report = log.verify(spark)
    assert report.ok, report.format()
    assert report.events == 12 and report.last_seq == 12
