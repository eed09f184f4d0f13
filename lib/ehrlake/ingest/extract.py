"""Hospital CSV extracts, declared in ``conf/extracts/<name>.yaml`` rather than in code.

A hospital's extract has its own table shapes (the MIMIC-IV demo, the Diabetes 130-US file, a
district hospital's nightly dump). Its declaration names, per table: the files that feed it (globs
over the file name), the key columns, the patient id column (for ``patient_key``), which columns
are dates, timestamps or numbers, which hold identifiers or free text (sealed), and the tokens that
mean "missing" (``?`` in Diabetes 130-US). Every header column is kept, named by
:func:`~ehrlake.ingest.csv_tables.canonical`; bronze tables are ``bronze.<extract>_<table>``.
Mapping onto the common model is a separate declaration (``conf/mappings/<extract>.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ehrlake.errors import ConfigError
from ehrlake.home import CONF
from ehrlake.ingest.csv_tables import CsvCatalog, CsvTable, canonical
from ehrlake.security.protection import TableProtection

EXTRACTS_DIR = CONF / "extracts"
_TABLE_KEYS = {"files", "keys", "patient_id", "dates", "timestamps", "numbers", "identifiers", "free_text"}
_TOP_KEYS = {"extract", "description", "source_system", "missing", "ignored", "tables"}


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
    data = yaml.safe_load(path.read_text()) or {}
    _only(data, _TOP_KEYS, str(path))
    name = data.get("extract")
    if not name or canonical(name) != name:
        raise ConfigError(f"{path}: 'extract' must be a lower-case name (letters, digits, _), got {name!r}")
    missing = tuple(str(m) for m in data.get("missing") or ())
    tables, patterns = {}, {}
    for short, spec in (data.get("tables") or {}).items():
        spec = spec or {}
        _only(spec, _TABLE_KEYS, f"{path}: tables.{short}")
        identifiers = tuple(spec.get("identifiers") or ())
        free_text = tuple((c, "true") for c in spec.get("free_text") or ())
        tables[short] = CsvTable(
            f"bronze.{name}_{short}",
            key_columns=tuple(spec.get("keys") or ()),
            dates=tuple(spec.get("dates") or ()),
            timestamps=tuple(spec.get("timestamps") or ()),
            numbers=tuple(spec.get("numbers") or ()),
            missing=missing,
            protection=TableProtection(
                identifiers + tuple(f"{c}_text" for c, _ in free_text),
                patient_id=spec.get("patient_id"),
                free_text=free_text,
            ),
        )
        patterns[short] = tuple(spec.get("files") or (short,))
    if not tables:
        raise ConfigError(f"{path}: declares no tables")
    catalog = CsvCatalog(f"{name} extract", tables, patterns, tuple(data.get("ignored") or ()))
    return Extract(name, str(data.get("source_system") or name), catalog)


def _only(data: dict, allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
