"""Source mappings onto the common clinical model: ``conf/mappings/<source>.yaml`` read, typed
and checked (known entities and columns, lookups expanded) before any Spark work starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ehrlake.clean.model import ENTITIES
from ehrlake.config import build, read_yaml
from ehrlake.errors import ConfigError
from ehrlake.home import CONF

MAPPINGS_DIR = CONF / "mappings"
DEFAULT_SOURCES = ("fhir", "synthea", "mimic", "diabetes130", "images")


@dataclass(frozen=True)
class Join:
    """A left join of another bronze table, bringing ``columns`` (e.g. a lab item's name)."""

    table: str = ""
    using: tuple[str, ...] = ()  # key columns present in both (YAML reads a bare `on` as true)
    columns: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.table or not self.using:
            raise ConfigError(f"a join needs a table and the columns it is 'using' (got {self})")


@dataclass(frozen=True)
class _Declared:
    """One entity's mapping as written in the file (before lookups are expanded)."""

    table: str = field(default="", metadata={"key": "from"})
    columns: dict[str, str] = field(default_factory=dict)
    where: str | None = None
    join: tuple[Join, ...] = ()
    lateral: str | None = None

    def validate(self) -> None:
        if not self.table or not self.columns:
            raise ConfigError("a mapping needs 'from' (its bronze table) and 'columns'")


@dataclass(frozen=True)
class Mapping:
    """One source's mapping of one entity: bronze table, joins, generator, filter, column expressions."""

    source: str
    entity: str
    table: str
    columns: dict[str, str]
    where: str | None = None
    joins: tuple[Join, ...] = ()
    lateral: str | None = None  # a SQL generator with named outputs: "stack(2, a, b) AS (x)"
    written: dict[str, str] = field(default_factory=dict)  # columns as written, {{lookups}} unexpanded


def load_mappings(path: str | Path) -> list[Mapping]:
    """Read and check a mapping file: known entities, known columns, a source name.

    ``lookups:`` declares code tables (name -> {code: text}); ``{{name}}`` in any expression is
    replaced by the Spark SQL map literal, so ``element_at({{admission_type}}, admission_type_id)``
    reads a code's text. An entity holds one mapping or a list of them (one per bronze table).
    """
    path = Path(path)
    data = read_yaml(path)
    unknown = set(data) - {"source", "lookups", "entities"}
    if unknown:
        known = "source, lookups, entities"
        raise ConfigError(f"mapping {path}: unknown key(s) {sorted(unknown)} (known: {known})")
    source = data.get("source")
    if not source or not isinstance(source, str):
        raise ConfigError(f"mapping {path} names no source")
    lookups = {}
    for name, table in (data.get("lookups") or {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"mapping {path}: lookup {name} must map codes to text")
        lookups[name] = _map_literal(table)

    def expand(expr) -> str:
        def one(match: re.Match) -> str:
            if match.group(1) not in lookups:
                raise ConfigError(f"mapping {path}: unknown lookup {{{{{match.group(1)}}}}}")
            return lookups[match.group(1)]

        return re.sub(r"\{\{\s*(\w+)\s*\}\}", one, str(expr))

    out = []
    for name, specs in (data.get("entities") or {}).items():
        entity = ENTITIES.get(name)
        if entity is None:
            raise ConfigError(f"mapping {path}: unknown entity {name!r} (known: {', '.join(ENTITIES)})")
        known = {f.name for f in entity.mapped}
        for spec in specs if isinstance(specs, list) else [specs]:
            declared = build(_Declared, spec, f"mapping {path}: {name}")
            unknown = set(declared.columns) - known
            if unknown:
                raise ConfigError(f"mapping {path}: {name} has no column(s) {sorted(unknown)}")
            out.append(
                Mapping(
                    source,
                    name,
                    declared.table,
                    {k: expand(v) for k, v in declared.columns.items()},
                    expand(declared.where) if declared.where else None,
                    declared.join,
                    expand(declared.lateral) if declared.lateral else None,
                    dict(declared.columns),
                )
            )
    return out


def _map_literal(table: dict) -> str:
    def quote(v) -> str:
        return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"

    return "map(" + ", ".join(f"{quote(k)}, {quote(v)}" for k, v in table.items()) + ")"


def mapping_files(sources=DEFAULT_SOURCES) -> list[Path]:
    return [MAPPINGS_DIR / f"{s}.yaml" for s in sources]
