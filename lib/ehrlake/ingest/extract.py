"""Hospital CSV extracts, declared in ``conf/extracts/<name>.yaml`` rather than in code.

A hospital's extract has its own table shapes (the MIMIC-IV demo, the Diabetes 130-US file, a
district hospital's nightly dump). Its declaration names, per table: the files that feed it (globs
over the file name), the key columns, the patient id column (for ``patient_key``), which columns
are dates, timestamps or numbers, which hold identifiers or free text (sealed), and the tokens that
mean "missing" (``?`` in Diabetes 130-US). A table of clinical notes says which columns hold the
note's text and header (``notes:``): its text is sealed to the reveal key like any identifier,
and a ``note_text`` copy is kept for the clean job, which de-identifies it into ``silver.note``
as it does FHIR's notes (:mod:`ehrlake.clean.notes`). Every header column is kept, named by
:func:`~ehrlake.ingest.csv_tables.canonical`; bronze tables are ``bronze.<extract>_<table>``.
Mapping onto the common model is a separate declaration (``conf/mappings/<extract>.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ehrlake.config import build, read_yaml
from ehrlake.errors import ConfigError
from ehrlake.home import CONF
from ehrlake.ingest.csv_tables import CsvCatalog, CsvTable, canonical
from ehrlake.security.protection import TableProtection

EXTRACTS_DIR = CONF / "extracts"


@dataclass(frozen=True)
class NoteColumns:
    """The columns of a note table (``tables.<name>.notes``): ``text`` required; ``id`` defaults to
    the table's one key column; the others may be left out (null in ``silver.note``)."""

    text: str = ""
    id: str | None = None
    encounter: str | None = None
    date: str | None = None
    type: str | None = None
    author_role: str | None = None

    def validate(self) -> None:
        if not self.text:
            raise ConfigError("notes: 'text' names the column holding the note's text")

    def fields(self, keys: tuple[str, ...], where: str) -> tuple[tuple[str, str], ...]:
        """(note field, canonical column) pairs, as :func:`ehrlake.security.copies.note_of_row` reads them."""
        note_id = self.id or (keys[0] if len(keys) == 1 else None)
        if note_id is None:
            raise ConfigError(f"{where}.notes: name the note's 'id' column (the table has no single key)")
        named = {"note_id": note_id, "encounter": self.encounter, "date": self.date, "kind": self.type,
                 "author_role": self.author_role, "text": self.text}  # fmt: skip
        return tuple((f, canonical(c)) for f, c in named.items() if c)


@dataclass(frozen=True)
class DeclaredTable:
    """One table of an extract as declared (``tables.<name>``)."""

    files: tuple[str, ...] = ()  # globs over the file name; the table's own name when empty
    keys: tuple[str, ...] = ()
    patient_id: str | None = None
    dates: tuple[str, ...] = ()
    timestamps: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()
    identifiers: tuple[str, ...] = ()
    free_text: tuple[str, ...] = ()
    notes: NoteColumns | None = None  # a table of clinical notes


@dataclass(frozen=True)
class Declaration:
    """A whole ``conf/extracts/<name>.yaml``, typed and checked by :func:`ehrlake.config.build`."""

    extract: str = ""
    description: str | None = None
    source_system: str | None = None  # the extract's name when not given
    missing: tuple[str, ...] = ()  # tokens that mean "no value" ("?")
    ignored: tuple[str, ...] = ()  # globs of files in the folder that are not data
    tables: dict[str, DeclaredTable] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.extract or canonical(self.extract) != self.extract:
            got = self.extract
            raise ConfigError(f"'extract' must be a lower-case name (letters, digits, _), got {got!r}")
        if not self.tables:
            raise ConfigError(f"extract {self.extract} declares no tables")


@dataclass(frozen=True)
class Extract:
    name: str
    source_system: str  # default source system: an extract comes from one hospital / data set
    catalog: CsvCatalog


def available() -> list[str]:
    return sorted(p.stem for p in EXTRACTS_DIR.glob("*.yaml"))


def load(name_or_path: str) -> Extract:
    """The declaration ``conf/extracts/<name>.yaml`` (or a YAML file path), checked."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = EXTRACTS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no extract declaration {path} (known: {', '.join(available()) or 'none'})")
    declared = build(Declaration, read_yaml(path), str(path))
    name = declared.extract
    missing = tuple(str(m) for m in declared.missing)
    csv_tables, patterns = {}, {}
    for short, table in declared.tables.items():
        free_text = tuple((c, "true") for c in table.free_text)
        note_from = table.notes.fields(table.keys, f"tables.{short}") if table.notes else ()
        note_text = tuple(c for f, c in note_from if f == "text")  # sealed to the reveal key
        csv_tables[short] = CsvTable(
            f"bronze.{name}_{short}",
            key_columns=table.keys,
            dates=table.dates,
            timestamps=table.timestamps,
            numbers=table.numbers,
            missing=missing,
            protection=TableProtection(
                table.identifiers + note_text + tuple(f"{c}_text" for c, _ in free_text),
                patient_id=table.patient_id,
                free_text=free_text,
                note_from=note_from,
            ),
        )
        patterns[short] = table.files or (short,)
    catalog = CsvCatalog(f"{name} extract", csv_tables, patterns, declared.ignored)
    return Extract(name, declared.source_system or name, catalog)
