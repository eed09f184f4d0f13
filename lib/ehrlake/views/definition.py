"""ViewDefinition (SQL on FHIR v2): parsed from JSON and validated before anything runs.

A view that cannot run (no resource, a select that is not an object, a path that does not parse, an
undefined or ill-defined constant, unionAll branches with different columns, two columns of one
name) raises :class:`ViewError` naming the problem. What can only be known from the data (a
non-collection column with several values, a where path giving a non-boolean) fails at run time
with the same clarity (:mod:`ehrlake.views.runner`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ehrlake.errors import EhrlakeError
from ehrlake.views import fhirpath as fp


class ViewError(EhrlakeError):
    """An invalid ViewDefinition; the message says which part and why."""


# FHIR column types -> Spark SQL types of the output. Dates and times stay text as in FHIR (partial
# dates such as "2012-04" are valid); a column's ``ansi/type`` tag asks for a SQL type instead.
FHIR_TO_SQL = {
    "boolean": "boolean",
    "integer": "int",
    "positiveInt": "int",
    "unsignedInt": "int",
    "integer64": "bigint",
    "decimal": "double",
}

_CONSTANT_VALUE = {
    "valueBase64Binary": "string", "valueBoolean": "boolean", "valueCanonical": "string",
    "valueCode": "string", "valueDate": "date", "valueDateTime": "dateTime", "valueDecimal": "decimal",
    "valueId": "string", "valueInstant": "dateTime", "valueInteger": "integer", "valueInteger64": "integer",
    "valueOid": "string", "valuePositiveInt": "integer", "valueString": "string", "valueTime": "time",
    "valueUnsignedInt": "integer", "valueUri": "string", "valueUrl": "string", "valueUuid": "string",
}  # fmt: skip


SEALED_TAG = "ehrlake/sealed"  # value "identifier", or "birth_date" (sealed, birth_year kept in clear)


@dataclass(frozen=True)
class ViewColumn:
    name: str
    path: str
    node: object
    type: str | None
    collection: bool
    description: str
    tags: tuple[tuple[str, str], ...]

    def tag(self, name: str) -> str | None:
        return next((v for k, v in self.tags if k == name), None)

    @property
    def sql_type(self) -> str:
        """The Spark type of one value: the ``ansi/type`` tag, else the FHIR type's, else string."""
        return (self.tag("ansi/type") or FHIR_TO_SQL.get(self.type or "", "string")).lower()


@dataclass(frozen=True)
class Select:
    columns: tuple[ViewColumn, ...]
    selects: tuple[Select, ...]
    for_each: object | None
    for_each_or_null: object | None
    repeat: tuple[object, ...]
    union_all: tuple[Select, ...]

    def column_names(self) -> list[str]:
        """Output columns in the spec's order: own columns, nested selects, then unionAll's."""
        names = [c.name for c in self.columns]
        for s in self.selects:
            names += s.column_names()
        if self.union_all:
            names += self.union_all[0].column_names()
        return names

    def all_columns(self) -> list[ViewColumn]:
        out = list(self.columns)
        for s in self.selects:
            out += s.all_columns()
        if self.union_all:
            out += self.union_all[0].all_columns()
        return out


@dataclass(frozen=True)
class ViewDefinition:
    name: str | None
    resource: str
    status: str
    constants: dict[str, tuple[object, str]]
    select: tuple[Select, ...]
    where: tuple[tuple[str, object], ...]
    source: dict

    @property
    def root(self) -> Select:
        return Select((), self.select, None, None, (), ())

    def column_names(self) -> list[str]:
        return self.root.column_names()

    def columns(self) -> list[ViewColumn]:
        return self.root.all_columns()


def _path(value, where: str):
    if not isinstance(value, str):
        raise ViewError(f"{where}: a FHIRPath string expected, got {json.dumps(value)}")
    try:
        return fp.parse(value)
    except fp.FhirPathError as e:
        raise ViewError(f"{where}: {e}") from None


def _constant_refs(node, found: set[str]) -> None:
    if isinstance(node, fp.Constant):
        found.add(node.name)
    elif isinstance(node, tuple):
        for x in node:
            _constant_refs(x, found)
    elif hasattr(node, "__dataclass_fields__"):
        for name in node.__dataclass_fields__:
            _constant_refs(getattr(node, name), found)


def _column(raw, where: str) -> ViewColumn:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or "path" not in raw:
        raise ViewError(f"{where}: a column needs a name and a path")
    name = raw["name"]
    if not name.replace("_", "a").isalnum() or name[0].isdigit():
        raise ViewError(f"{where}: column name {name!r} must be letters, digits and underscores")
    collection = raw.get("collection", False)
    if not isinstance(collection, bool):
        raise ViewError(f"{where}.{name}: collection must be true or false")
    tags = tuple((t.get("name"), t.get("value")) for t in raw.get("tag", []) if isinstance(t, dict))
    return ViewColumn(
        name, raw["path"], _path(raw["path"], f"{where}.{name}"), raw.get("type"), collection,
        raw.get("description", ""), tags,
    )  # fmt: skip


def _select(raw, where: str) -> Select:
    if not isinstance(raw, dict):
        raise ViewError(f"{where}: a select must be an object")
    unknown = set(raw) - {"column", "select", "forEach", "forEachOrNull", "repeat", "unionAll"}
    if unknown:
        raise ViewError(f"{where}: unknown select element(s) {sorted(unknown)}")
    if sum(k in raw for k in ("forEach", "forEachOrNull", "repeat")) > 1:
        raise ViewError(f"{where}: at most one of forEach, forEachOrNull, repeat")
    columns = tuple(_column(c, f"{where}.column[{i}]") for i, c in enumerate(raw.get("column", [])))
    selects = tuple(_select(s, f"{where}.select[{i}]") for i, s in enumerate(raw.get("select", [])))
    union = tuple(_select(s, f"{where}.unionAll[{i}]") for i, s in enumerate(raw.get("unionAll", [])))
    if union:
        first = union[0].column_names()
        for i, branch in enumerate(union[1:], 1):
            if branch.column_names() != first:
                raise ViewError(
                    f"{where}.unionAll[{i}]: columns {branch.column_names()} differ from the first "
                    f"branch's {first} (names and order must match)"
                )
    repeat = raw.get("repeat", [])
    if not isinstance(repeat, list):
        raise ViewError(f"{where}.repeat: a list of FHIRPath strings expected")
    return Select(
        columns,
        selects,
        _path(raw["forEach"], f"{where}.forEach") if "forEach" in raw else None,
        _path(raw["forEachOrNull"], f"{where}.forEachOrNull") if "forEachOrNull" in raw else None,
        tuple(_path(p, f"{where}.repeat[{i}]") for i, p in enumerate(repeat)),
        union,
    )


def _constants(raw) -> dict[str, tuple[object, str]]:
    out = {}
    for i, c in enumerate(raw or []):
        values = [k for k in c if k.startswith("value")] if isinstance(c, dict) else []
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or len(values) != 1:
            raise ViewError(f"constant[{i}]: needs a name and exactly one value[x]")
        if values[0] not in _CONSTANT_VALUE:
            raise ViewError(f"constant {c['name']}: {values[0]} is not a FHIR primitive value")
        out[c["name"]] = (c[values[0]], _CONSTANT_VALUE[values[0]])
    return out


def parse(raw) -> ViewDefinition:
    """A validated :class:`ViewDefinition` from its JSON (a dict)."""
    if not isinstance(raw, dict) or not raw:
        raise ViewError("a ViewDefinition must be a non-empty JSON object")
    resource = raw.get("resource")
    if not isinstance(resource, str) or not resource:
        raise ViewError("a ViewDefinition needs its resource type ('resource')")
    selects = raw.get("select")
    if not isinstance(selects, list) or not selects:
        raise ViewError("a ViewDefinition needs at least one select")
    constants = _constants(raw.get("constant"))
    select = tuple(_select(s, f"select[{i}]") for i, s in enumerate(selects))
    where = tuple(
        (w.get("path"), _path(w.get("path"), f"where[{i}]")) for i, w in enumerate(raw.get("where", []))
    )
    view = ViewDefinition(
        raw.get("name"), resource, raw.get("status", "active"), constants, select, where, raw
    )
    names = view.column_names()
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ViewError(f"column name(s) used twice: {dupes}")
    used: set[str] = set()
    _constant_refs(select, used)
    _constant_refs(tuple(n for _, n in where), used)
    undefined = sorted(used - set(constants) - {"rowIndex", "resource", "rootResource"})
    if undefined:
        raise ViewError(f"undefined constant(s): {', '.join('%' + u for u in undefined)}")
    return view


def load(path: str | Path) -> ViewDefinition:
    """Read and validate a ViewDefinition JSON file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ViewError(f"cannot read view {path}: {e}") from None
    return parse(raw)


def protection(columns: list[ViewColumn], patient_id: str | None):
    """How a table of these columns is sealed: the columns tagged ``ehrlake/sealed`` (to the reveal
    key, but for the birth date, which clean opens to compute ages)."""
    from ehrlake.security.protection import TableProtection

    sealed = [c for c in columns if c.tag(SEALED_TAG) is not None]
    birth = next((c.name for c in sealed if c.tag(SEALED_TAG) == "birth_date"), None)
    return TableProtection(tuple(c.name for c in sealed), patient_id=patient_id, birth_date=birth)
