"""The audit log's hash chain, signed checkpoints and witness catch each kind of tampering."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from ehrlake.security.audit import DENIED, Event


@pytest.fixture
def audit(lake):
    """Three appends, each ending with a signed checkpoint: reads (seq 1-3, checkpoint 4), a denied
    read (5, checkpoint 6), a job's writes (7-11, checkpoint 12)."""
    log = lake.security.audit
    log.record(*[Event("read", role="analyst", table_name=f"silver.t{i}") for i in range(1, 4)])
    log.record(Event("read", role="analyst", table_name="bronze.fhir_patient", outcome=DENIED))
    log.record(
        *[
            Event("write", role="engineer", job="ingest", table_name=f"bronze.t{i}", run_id="r1")
            for i in range(7, 12)
        ]
    )
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


def test_untouched_log_verifies_with_chain_and_signed_checkpoints(spark, lake, audit):
    report = audit.verify(lake)
    assert report.ok, report.format()
    assert (report.events, report.checkpoints, report.last_seq) == (12, 3, 12)
    rows = {r.seq: r for r in spark.read.parquet(*[u for u in DeltaTable(audit.path).file_uris()]).collect()}
    assert rows[1].prev_hash == "0" * 64 and rows[2].prev_hash == rows[1].hash
    assert rows[5].outcome == "denied" and rows[6].action == "checkpoint" and rows[6].signature


def test_editing_one_field_of_one_event_is_detected(spark, lake, audit):
    _rewrite_in_place(audit.path, 5, "outcome", "allowed")  # hide a denied access
    report = audit.verify(lake)
    assert not report.ok and report.first_broken == 5 and "edited" in report.reason


def test_deleting_an_event_is_detected(spark, lake, audit):
    DeltaTable(audit.path).delete("seq = 8")
    report = audit.verify(lake)
    assert not report.ok and report.first_broken == 8 and "deleted" in report.reason
    assert any("DELETE" in p for p in report.problems)  # the Delta history shows it too


def test_reordering_two_events_is_detected(spark, lake, audit):
    _rewrite_in_place(audit.path, 8, "seq", 99)
    _rewrite_in_place(audit.path, 9, "seq", 8)
    _rewrite_in_place(audit.path, 99, "seq", 9)
    report = audit.verify(lake)
    assert not report.ok and report.first_broken == 8


def test_truncating_the_tail_after_a_checkpoint_is_detected_by_the_witness(spark, lake, audit):
    log_dir = Path(audit.path) / "_delta_log"
    commits = sorted(log_dir.glob("*.json"))
    # Roll the table back to just after the second checkpoint (seq 6): delete the last commit.
    # The chain that remains is intact, signed, and every commit left is an append; only the
    # witness knows.
    for commit in commits[3:]:
        os.remove(commit)
    assert DeltaTable(audit.path).to_pyarrow_table(columns=["seq"]).num_rows == 6
    report = audit.verify(lake)
    assert not report.ok and "truncated" in report.reason and report.first_broken == 7


def test_a_forged_checkpoint_signature_is_detected(spark, lake, audit):
    _rewrite_in_place(audit.path, 6, "signature", "AAAA" + "B" * 84)
    report = audit.verify(lake)
    assert not report.ok and report.first_broken == 6 and "signature" in report.reason


def test_concurrent_writers_never_fork_the_chain(spark, lake):
    from concurrent.futures import ThreadPoolExecutor

    log = lake.security.audit
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: log.record(Event("read", role="analyst", detail=str(i))), range(12)))
    report = log.verify(lake)
    assert report.ok, report.format()
    assert report.events == 24 and report.last_seq == 24 and report.checkpoints == 12


def _rechain_from(path: str, seq: int, column: str, value) -> None:
    """The stronger attacker: change one event, recompute every later hash and link, and relabel
    the later checkpoints as plain events (they cannot be re-signed without the key store), all in
    place, so the Delta log still shows appends only."""
    from ehrlake.security.audit import TEXT_FIELDS, event_hash

    files = [u.removeprefix("file://") for u in DeltaTable(path).file_uris()]
    tables = {f: pq.read_table(f).to_pylist() for f in files}
    rows = sorted((r for t in tables.values() for r in t), key=lambda r: r["seq"])
    prev = None
    for row in rows:
        if row["seq"] == seq:
            row[column] = value
        if row["seq"] >= seq:
            if row["action"] == "checkpoint":
                row["action"], row["signing_key_id"], row["signature"] = "note", None, None
            row["prev_hash"] = prev
            at_us = int(row["at"].timestamp() * 1_000_000)
            row["hash"] = event_hash(prev, row["seq"], at_us, [row[f] for f in TEXT_FIELDS])
        prev = row["hash"]
    for f, original in tables.items():
        seqs = {r["seq"] for r in original}
        schema = pq.read_schema(f)
        pq.write_table(pa.Table.from_pylist([r for r in rows if r["seq"] in seqs], schema=schema), f)


def test_a_rechained_log_fails_at_its_path_and_as_a_copy_elsewhere(spark, lake, audit, tmp_path):
    """Hide the denied access, re-chain everything after it, strip the later signatures: the chain
    is consistent again, but the log no longer ends with a signed checkpoint, and the witness (found
    by the lake's id, not its path) remembers another head, also for a copy of the lake elsewhere,
    also when the witness is rewritten to match."""
    import json
    import shutil

    from ehrlake.lake import Lake
    from ehrlake.security.audit import AuditLog

    _rechain_from(audit.path, 5, "outcome", "allowed")
    report = audit.verify(lake)
    assert not report.ok and any("signed checkpoint" in p for p in report.problems), report.format()
    copy = tmp_path / "copied-lake"
    shutil.copytree(audit.lake_root, copy)
    elsewhere = AuditLog(str(copy), audit.signer.store, audit.checkpoint_every)
    copied = elsewhere.verify(Lake(str(copy), spark))
    assert not copied.ok and any("witness" in p for p in copied.problems), copied.format()
    files = [u.removeprefix("file://") for u in DeltaTable(audit.path).file_uris()]
    head = max((r for f in files for r in pq.read_table(f).to_pylist()), key=lambda r: r["seq"])
    audit.witness_file.write_text(json.dumps({"lake": "x", "seq": head["seq"], "hash": head["hash"]}))
    still = audit.verify(lake)
    assert not still.ok and any("signed checkpoint" in p for p in still.problems)
    identity_file = copy / "_ehrlake" / "identity.json"  # give the copy a new id: no witness at all
    ident = json.loads(identity_file.read_text())
    identity_file.write_text(json.dumps({**ident, "lake_id": "f" * 32}))
    renamed = AuditLog(str(copy), audit.signer.store, audit.checkpoint_every).verify(Lake(str(copy), spark))
    assert not renamed.ok and any("no witness" in p for p in renamed.problems)


def test_a_log_with_more_than_checkpoint_every_unsigned_events_fails(spark, lake):
    log = lake.security.audit
    log.checkpoint_every = 3
    log.record(*[Event("read", role="analyst", detail=str(i)) for i in range(7)])  # 3, cp, 3, cp, 1, cp
    assert log.verify(lake).ok and log.verify(lake).checkpoints == 3
    _rewrite_in_place(log.path, 4, "action", "note")  # a checkpoint relabelled: 7 events unsigned
    report = log.verify(lake)
    assert not report.ok and any("more than 3 events" in p for p in report.problems)
