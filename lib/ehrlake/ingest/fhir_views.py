"""The typed bronze FHIR tables, declared as SQL on FHIR v2 ViewDefinitions in ``conf/views/``.

One JSON file per table (``conf/views/fhir_condition.json`` -> ``bronze.fhir_condition``): its
``resource`` says which resource type feeds it, its columns say what is typed and how, with the
standard ``ansi/type`` tag for SQL dates and timestamps and an ``ehrlake/sealed`` tag on the columns
that identify a person (value ``identifier``, or ``birth_date``: sealed with ``birth_year`` kept in
clear). A user adds a resource type or a column by adding a view or a column: no code. Types with no
view land whole (sealed) in ``bronze.fhir_other``. ``conf/views/drift.yaml`` lists the known
departures from R4 that are read as R4 (and recorded in ``conformance_issues``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from ehrlake.config import build, read_yaml
from ehrlake.errors import ConfigError
from ehrlake.home import CONF
from ehrlake.security import copies
from ehrlake.security.protection import TableProtection
from ehrlake.views import definition
from ehrlake.views.compiler import Drift
from ehrlake.views.definition import ViewDefinition

VIEWS_DIR = CONF / "views"
PATIENT_COLUMN = "patient_id"


@dataclass(frozen=True)
class BronzeView:
    """One typed bronze table: its view, the resource type's drifts, and what it seals."""

    table: str
    view: ViewDefinition
    drift: Drift | None

    @property
    def resource_type(self) -> str:
        return self.view.resource

    @property
    def columns(self) -> list[definition.ViewColumn]:
        """The typed columns (the key ``id`` comes from the record's envelope)."""
        return [c for c in self.view.columns() if c.name != "id"]

    @property
    def patient_column(self) -> str | None:
        """The column naming the patient a record is about; a record without it cannot be linked."""
        return PATIENT_COLUMN if any(c.name == PATIENT_COLUMN for c in self.columns) else None

    @property
    def protection(self) -> TableProtection:
        """The view's sealed columns, plus the FHIR record's processing copies (``raw_deid``; a
        patient's fingerprints, a document's note text: :mod:`ehrlake.security.copies`)."""
        patient = "id" if self.resource_type == "Patient" else self.patient_column
        return dataclasses.replace(
            definition.protection(self.columns, patient),
            fhir_records=True,
            copies=copies.BY_RESOURCE.get(self.resource_type, ()),
        )


@dataclass(frozen=True)
class _DeclaredDrift:
    """One resource type's entry in ``drift.yaml``."""

    renamed: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # R4 name <- old
    string_as_concept: tuple[str, ...] = ()


def _drifts(folder: Path) -> dict[str, Drift]:
    path = folder / "drift.yaml"
    if not path.exists():
        return {}
    out = {}
    for resource, spec in read_yaml(path).items():
        declared = build(_DeclaredDrift, spec, f"{path}: {resource}")
        out[resource] = Drift(declared.renamed, declared.string_as_concept)
    return out


def _check(view: ViewDefinition, path: Path) -> None:
    if not view.name or not view.name.replace("_", "a").isalnum() or view.name != view.name.lower():
        raise ConfigError(f"{path}: a bronze view needs a lower-case 'name' (it names the table)")
    top = view.select
    if any(s.for_each or s.for_each_or_null or s.repeat or s.union_all for s in top):
        raise ConfigError(
            f"{path}: a bronze view gives one row per resource (no top-level forEach/repeat/unionAll)"
        )
    names = [c.name for c in view.columns()]
    if "id" not in names:
        raise ConfigError(f"{path}: a bronze view has an 'id' column (getResourceKey())")
    reserved = {"source_system", "version_id", "last_updated", "raw", "record_hash", "conformance_issues"}
    clash = reserved & set(names)
    if clash:
        raise ConfigError(f"{path}: column name(s) {sorted(clash)} are reserved for the bronze table")


@functools.lru_cache(maxsize=4)
def load(folder: str | None = None) -> dict[str, BronzeView]:
    """Every bronze view, by resource type (one table per type)."""
    root = Path(folder) if folder else VIEWS_DIR
    drifts = _drifts(root)
    out: dict[str, BronzeView] = {}
    for path in sorted(root.glob("*.json")):
        try:
            view = definition.load(path)
        except definition.ViewError as e:
            raise ConfigError(f"{path}: {e}") from None
        _check(view, path)
        if view.resource in out:
            raise ConfigError(f"{path}: {view.resource} already feeds {out[view.resource].table}")
        out[view.resource] = BronzeView(f"bronze.{view.name}", view, drifts.get(view.resource))
    if not out:
        raise ConfigError(f"no bronze views (*.json) in {root}")
    return out


def by_table() -> dict[str, BronzeView]:
    return {v.table: v for v in load().values()}
