"""What an ingest run did, per bronze table, in counts that must add up:
``records_in = inserted + updated + unchanged + duplicate + quarantined``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

UNPARSED = "(unparsed)"


@dataclass
class EntityCounts:
    entity: str
    records_in: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicate: int = 0
    quarantined: int = 0
    # loaded records with fields that could not be read as FHIR R4 (see their conformance_issues);
    # not part of the balance: such a record is loaded, not lost
    with_issues: int = 0

    @property
    def loaded(self) -> int:
        return self.inserted + self.updated

    @property
    def balanced(self) -> bool:
        return (
            self.records_in
            == self.inserted + self.updated + self.unchanged + self.duplicate + self.quarantined
        )


@dataclass
class IngestReport:
    run_id: str
    source_kind: str
    source_system: str
    input: str
    lake: str
    files_found: int
    files_new: int
    records_read: int = 0
    entities: dict[str, EntityCounts] = field(default_factory=dict)
    empty_files: list[str] = field(default_factory=list)  # new files without a single record
    notes: list[str] = field(default_factory=list)  # what was tolerated: column drift, empty files

    def entity(self, name: str) -> EntityCounts:
        return self.entities.setdefault(name, EntityCounts(name))

    @property
    def total(self) -> EntityCounts:
        t = EntityCounts("total")
        for c in self.entities.values():
            for f in (
                "records_in",
                "inserted",
                "updated",
                "unchanged",
                "duplicate",
                "quarantined",
                "with_issues",
            ):
                setattr(t, f, getattr(t, f) + getattr(c, f))
        return t

    @property
    def balanced(self) -> bool:
        return all(c.balanced for c in self.entities.values()) and self.total.records_in == self.records_read

    def as_dict(self) -> dict:
        data = asdict(self)
        data["entities"] = [asdict(c) for c in sorted(self.entities.values(), key=lambda c: c.entity)]
        data["total"] = asdict(self.total)
        data["balanced"] = self.balanced
        return data

    def format(self) -> str:
        head = (
            f"ingest run {self.run_id}: {self.source_kind} from {self.input} (system {self.source_system})\n"
            f"files: {self.files_found} found, {self.files_new} new"
            + ("" if self.files_new else " - nothing to ingest")
            + f"; lake: {self.lake}\n"
        )
        cols = ("records_in", "inserted", "updated", "unchanged", "duplicate", "quarantined", "with_issues")
        width = max([len(n) for n in self.entities] + [12])
        lines = [f"{'table':<{width}}" + "".join(f"{c:>12}" for c in cols)]
        for c in [*sorted(self.entities.values(), key=lambda c: c.entity), self.total]:
            lines.append(f"{c.entity:<{width}}" + "".join(f"{getattr(c, k):>12,}" for k in cols))
        check = "OK" if self.balanced else "MISMATCH"
        tail = (
            f"check: {self.records_read:,} records read = inserted + updated + unchanged + duplicate + "
            f"quarantined: {check}"
        )
        for note in self.notes:
            tail += f"\nnote: {note}"
        if self.total.with_issues:
            tail += (
                f"\n{self.total.with_issues:,} loaded records have fields that could not be read as FHIR R4: "
                "see their conformance_issues column"
            )
        return head + "\n".join(lines) + "\n" + tail
