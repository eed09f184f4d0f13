"""The tamper-evident audit log: an append-only Delta table ``audit.events`` whose rows form a hash chain.

Each event stores ``hash = SHA-256(prev_hash, seq, time, every field)`` and the previous event's
hash, so editing, deleting or reordering any event breaks the chain from that point. Hashes alone
can be recomputed by whoever rewrites the table, so verification rests on signatures: a
*checkpoint* event signs the chain head with an Ed25519 key that only the key store can unwrap,
after at most ``checkpoint_every`` events and at the end of every append (so at the end of every
job); the last event must be a checkpoint whose signature verifies. A *witness* file in the key
store (outside the lake), named by the lake's id (not its path, see ``identity.py``), remembers the
newest event seen: cutting off the tail, or verifying a rewritten copy elsewhere, is detected, and
a log with events but no witness fails.

Events are written from the driver with delta-rs (a few rows per commit, no Spark job) and commits
are serialised: a commit that finds another writer got there first re-reads the tail and retries,
so the chain never forks. Verification runs in Spark (hashes recomputed in SQL, links checked by a
join), so it scales with the log and never collects it on the driver.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import CommitProperties
from pyspark.sql import functions as F

from ehrlake.errors import ConfigError, EhrlakeError
from ehrlake.security import identity
from ehrlake.security.grants import current_user
from ehrlake.security.keys import KeyStore, replace_whole

TABLE = "audit.events"
GENESIS = "0" * 64
SEP = "\x1f"
NULL = "\x00"
SIGNING = "_audit_signing"  # key store entry whose 32 bytes are the Ed25519 private key
# Fields covered by the hash, in order (seq and time are hashed as integers, see _canonical).
TEXT_FIELDS = (
    "os_user", "role", "job", "action", "table_name", "columns", "patient_key", "outcome", "detail", "run_id",
)  # fmt: skip
SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64()),
        pa.field("at", pa.timestamp("us", tz="UTC")),
        *[pa.field(name, pa.string()) for name in TEXT_FIELDS],
        pa.field("prev_hash", pa.string()),
        pa.field("hash", pa.string()),
        pa.field("signing_key_id", pa.string()),
        pa.field("signature", pa.string()),
    ]
)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ALLOWED, DENIED, ERROR = "allowed", "denied", "error"


@dataclass
class Event:
    """Who did what to which table, when, and with what outcome."""

    action: str  # read | reveal | write | ingest | keys.rotate | keys.reencrypt | checkpoint | ...
    outcome: str = ALLOWED
    role: str | None = None
    job: str | None = None
    table_name: str | None = None
    columns: list[str] | None = None
    patient_key: str | None = None
    detail: str | None = None
    run_id: str | None = None
    os_user: str = field(default_factory=lambda: current_user())


def _canonical(prev_hash: str, seq: int, at_us: int, texts: list[str | None]) -> str:
    return SEP.join([prev_hash, str(seq), str(at_us), *(NULL if t is None else t for t in texts)])


def event_hash(prev_hash: str, seq: int, at_us: int, texts: list[str | None]) -> str:
    return hashlib.sha256(_canonical(prev_hash, seq, at_us, texts).encode()).hexdigest()


class Signer:
    """The Ed25519 checkpoint key: private half wrapped in the key store, public half in clear."""

    def __init__(self, store: KeyStore):
        self.store = store

    @property
    def _public_file(self) -> Path:
        return self.store.directory / f"{SIGNING}.pub.json"

    def key_id(self) -> str:
        key_id = self.store.current_id(SIGNING)
        published = self.public_keys()
        if key_id not in published:
            private = Ed25519PrivateKey.from_private_bytes(self.store.get(key_id).material)
            raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            published[key_id] = base64.b64encode(raw).decode()
            # replaced whole, never rewritten in place: concurrent signers read it meanwhile
            replace_whole(self._public_file, json.dumps(published, indent=2))
        return key_id

    def sign(self, key_id: str, digest: str) -> str:
        private = Ed25519PrivateKey.from_private_bytes(self.store.get(key_id).material)
        return base64.b64encode(private.sign(digest.encode())).decode()

    def public_keys(self) -> dict[str, str]:
        """Key id -> base64 public key; all a verifier needs (no master key)."""
        return json.loads(self._public_file.read_text()) if self._public_file.is_file() else {}


def verify_signature(public_b64: str, digest: str, signature_b64: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64)).verify(
            base64.b64decode(signature_b64), digest.encode()
        )
        return True
    except (InvalidSignature, ValueError):
        return False


class AuditLog:
    """Append events to ``<lake>/audit/events`` and verify the chain."""

    def __init__(self, lake_root: str, store: KeyStore, checkpoint_every: int = 1000):
        self.lake_root = os.path.abspath(lake_root)
        self.path = os.path.join(self.lake_root, "audit", "events")
        self.signer = Signer(store)
        self.checkpoint_every = checkpoint_every

    @property
    def witness_file(self) -> Path:
        """The witness of this lake (by its id; the lake is bound to this key store first)."""
        lake_id = identity.bind(self.lake_root, self.signer.store).lake_id
        return self.signer.store.directory / f"audit-witness-{lake_id}.json"

    # ------------------------------------------------------------------ writing
    def record(self, *events: Event, checkpoint: bool = True) -> int:
        """Append ``events`` and a signed checkpoint (also one after every ``checkpoint_every``
        events) in one commit; returns the last seq. Retries when another writer committed first,
        so seq and links stay unique. (``checkpoint`` is kept for callers: every append ends signed.)"""
        witness_file = self.witness_file  # binds the lake to this key store before anything is written
        for _attempt in range(50):
            try:
                table = self._table()
            except (CommitFailedError, TableNotFoundError):  # another writer is creating it right now
                time.sleep(0.02)
                continue
            seq, prev = self._tail(table)
            rows, last = self._chain(events, seq, prev, checkpoint)
            try:
                write_deltalake(
                    table,
                    pa.Table.from_pylist(rows, schema=SCHEMA),
                    mode="append",
                    commit_properties=CommitProperties(
                        custom_metadata={
                            "ehrlakeOperation": "AUDIT",
                            "ehrlakeAuditTail": f"{last[0]}:{last[1]}",
                        },
                        max_commit_retries=0,
                    ),
                )
            except CommitFailedError:
                time.sleep(0.02)
                continue
            self._witness(witness_file, *last)
            return last[0]
        raise EhrlakeError(f"could not append to {TABLE}: 50 concurrent writers in a row got there first")

    def _table(self) -> DeltaTable:
        """The events table, created on first use (a concurrent creator winning is fine)."""
        if not DeltaTable.is_deltatable(self.path):
            DeltaTable.create(self.path, SCHEMA, mode="ignore")
        return DeltaTable(self.path)

    def _chain(self, events, seq: int, prev: str, checkpoint: bool) -> tuple[list[dict], tuple[int, str]]:
        rows: list[dict] = []
        since = 0  # events since the last checkpoint in this append
        for event in events:
            seq += 1
            rows.append(self._row(event, seq, prev))
            prev, since = rows[-1]["hash"], since + 1
            if since == self.checkpoint_every:
                seq, prev = self._checkpoint(rows, seq, prev)
                since = 0
        if since or not rows:
            seq, prev = self._checkpoint(rows, seq, prev)
        return rows, (seq, prev)

    def _checkpoint(self, rows: list[dict], seq: int, prev: str) -> tuple[int, str]:
        seq += 1
        key_id = self.signer.key_id()
        row = self._row(Event("checkpoint", detail=f"signs events 1..{seq}"), seq, prev)
        row["signing_key_id"], row["signature"] = key_id, self.signer.sign(key_id, row["hash"])
        rows.append(row)
        return seq, row["hash"]

    @staticmethod
    def _row(event: Event, seq: int, prev: str) -> dict:
        at_us = time.time_ns() // 1000
        values = {
            "os_user": event.os_user,
            "role": event.role,
            "job": event.job,
            "action": event.action,
            "table_name": event.table_name,
            "columns": json.dumps(event.columns) if event.columns is not None else None,
            "patient_key": event.patient_key,
            "outcome": event.outcome,
            "detail": event.detail,
            "run_id": event.run_id,
        }
        digest = event_hash(prev, seq, at_us, [values[f] for f in TEXT_FIELDS])
        return {
            "seq": seq,
            "at": EPOCH + dt.timedelta(microseconds=at_us),
            **values,
            "prev_hash": prev,
            "hash": digest,
            "signing_key_id": None,
            "signature": None,
        }

    @staticmethod
    def _tail(table: DeltaTable) -> tuple[int, str]:
        """(last seq, its hash): from our own last commit's metadata, else from the data."""
        last = table.history(1)[0]
        tail = last.get("ehrlakeAuditTail")
        if tail:
            seq, digest = tail.split(":", 1)
            return int(seq), digest
        data = table.to_pyarrow_table(columns=["seq", "hash"])
        if data.num_rows == 0:
            return 0, GENESIS
        top = data.sort_by([("seq", "descending")]).slice(0, 1).to_pylist()[0]
        return int(top["seq"]), top["hash"]

    def _witness(self, witness_file: Path, seq: int, digest: str) -> None:
        """Remember the newest event outside the lake (only ever moving forward)."""
        current = json.loads(witness_file.read_text()) if witness_file.is_file() else None
        if current and current["seq"] >= seq:
            return
        witness_file.parent.mkdir(parents=True, exist_ok=True)
        replace_whole(witness_file, json.dumps({"lake": self.lake_root, "seq": seq, "hash": digest}), 0o600)

    def witness(self) -> dict | None:
        path = self.witness_file
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ verifying
    def verify(self, lake) -> VerifyReport:
        """Recompute every hash and link in Spark; check signatures, the witness and the Delta history.
        ``lake`` is the lake this log belongs to (read through its storage engine, no access policy)."""
        if os.path.realpath(lake.root) != os.path.realpath(self.lake_root):
            raise ConfigError(
                f"the audit log of {self.lake_root} cannot be verified through lake {lake.root}"
            )
        report = VerifyReport()
        if not os.path.isdir(os.path.join(self.path, "_delta_log")):
            if self.witness():
                report.broken(1, "the audit log is missing but the witness has seen events")
            return report
        events = lake.read(TABLE).persist()
        try:
            self._verify_chain(events, report)
            self._verify_checkpoints(events, report)
            self._verify_witness(events, report)
        finally:
            events.unpersist()
        for commit in DeltaTable(self.path).history():
            operation = commit.get("operation")
            mode = (commit.get("operationParameters") or {}).get("mode")
            if operation not in ("CREATE TABLE", "WRITE") or (operation == "WRITE" and mode != "Append"):
                report.problems.append(
                    f"Delta version {commit.get('version')}: {operation} {mode or ''}".strip()
                    + " changed the log (only appends are allowed)"
                )
        return report

    def _verify_chain(self, events, report: VerifyReport) -> None:
        texts = [F.coalesce(F.col(f), F.lit(NULL)) for f in TEXT_FIELDS]
        recomputed = F.sha2(
            F.concat_ws(
                SEP,
                F.col("prev_hash"),
                F.col("seq").cast("string"),
                F.expr("CAST(unix_micros(at) AS STRING)"),
                *texts,
            ),
            256,
        )
        stats = events.agg(F.count("*").alias("n"), F.max("seq").alias("top")).first()
        report.events = int(stats["n"])
        if report.events == 0:
            return
        bad_hash = events.where(recomputed != F.col("hash")).agg(F.min("seq")).first()[0]
        if bad_hash is not None:
            report.broken(bad_hash, "its content does not match its hash (edited)")
        a, b = events.alias("a"), events.alias("b")
        bad_link = (
            a.join(b, F.col("a.seq") == F.col("b.seq") + 1)
            .where(F.col("a.prev_hash") != F.col("b.hash"))
            .agg(F.min("a.seq"))
            .first()[0]
        )
        if bad_link is not None:
            report.broken(bad_link, "its prev_hash is not the hash of event seq-1 (reordered or replaced)")
        first = events.where("seq = 1").select("prev_hash").first()
        if first is None:
            report.broken(1, "event 1 is missing")
        elif first["prev_hash"] != GENESIS:
            report.broken(1, "the first event does not start the chain")
        gap = (
            a.join(b, F.col("a.seq") == F.col("b.seq") + 1, "left_anti")
            .where("a.seq > 1")
            .agg(F.min("a.seq"))
            .first()[0]
        )
        if gap is not None:
            report.broken(gap - 1, "the event before it is missing (deleted)")
        dup = events.groupBy("seq").count().where("count > 1").agg(F.min("seq")).first()[0]
        if dup is not None:
            report.broken(dup, "two events share this seq (forked or duplicated)")
        report.last_seq = int(stats["top"])

    def _verify_checkpoints(self, events, report: VerifyReport) -> None:
        """Every checkpoint's signature verifies, none is more than ``checkpoint_every`` events
        after the previous one, and the log ends with one (re-chained events cannot be re-signed)."""
        keys = self.signer.public_keys()
        rows = events.where("action = 'checkpoint'").select("seq", "hash", "signing_key_id", "signature")
        previous = 0
        for row in rows.orderBy("seq").toLocalIterator():
            report.checkpoints += 1
            public = keys.get(row["signing_key_id"] or "")
            if (
                public is None
                or not row["signature"]
                or not verify_signature(public, row["hash"], row["signature"])
            ):
                report.broken(row["seq"], "checkpoint signature does not verify")
            if row["seq"] - previous - 1 > self.checkpoint_every:
                report.broken(
                    row["seq"], f"more than {self.checkpoint_every} events since the previous checkpoint"
                )
            previous = row["seq"]
        if report.events and report.last_seq is not None and previous != report.last_seq:
            report.broken(
                report.last_seq,
                "the log does not end with a signed checkpoint (events after it are unsigned)",
            )

    def _verify_witness(self, events, report: VerifyReport) -> None:
        seen = self.witness()
        if not seen:
            if report.events:
                report.broken(
                    report.last_seq or 1,
                    "no witness for this lake in the key store (a copy with another id, or the "
                    "witness was removed)",
                )
            return
        match = events.where(F.col("seq") == seen["seq"]).select("hash").first()
        if match is None:
            report.broken(
                (report.last_seq or 0) + 1,
                f"the log ends at seq {report.last_seq} but the witness has seen seq {seen['seq']} "
                "(truncated)",
            )
        elif match["hash"] != seen["hash"]:
            report.broken(seen["seq"], "differs from the event the witness recorded")


@dataclass
class VerifyReport:
    events: int = 0
    checkpoints: int = 0
    last_seq: int | None = None
    first_broken: int | None = None
    reason: str | None = None
    problems: list[str] = field(default_factory=list)

    def broken(self, seq: int, why: str) -> None:
        self.problems.append(f"seq {seq}: {why}")
        if self.first_broken is None or seq < self.first_broken:
            self.first_broken, self.reason = int(seq), why

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        if self.ok:
            return f"audit log OK: {self.events} events, {self.checkpoints} signed checkpoints, chain intact"
        lines = (
            [f"audit log BROKEN at seq {self.first_broken}: {self.reason}"]
            if self.first_broken
            else ["audit log BROKEN"]
        )
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
