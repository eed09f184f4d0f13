"""Running a ViewDefinition on Spark: resources in, one typed row per view row out, all in the JVM.

Each resource is parsed once into a VARIANT. The view's select tree compiles into one expression per
resource that builds its rows as an ``array<struct>`` (``forEach`` maps over a collection,
``forEachOrNull`` keeps one all-null row for an empty one, ``repeat`` follows the paths depth-first,
``unionAll`` concatenates, sibling selects cross-join); one ``explode`` turns them into rows.

Two modes:
- *strict* (the SQL on FHIR semantics, :func:`run`): a non-collection column with several values or
  a ``where`` path that is not boolean fails the query with a message naming the column or path;
- *tolerant* (bronze ingest, ``tolerant=True``): the first value is kept, a value that is not of the
  column's type becomes null, known drifts from R4 are read as R4, and every such problem is listed in
  the row's ``conformance_issues`` (column and problem, never the value).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.views import compiler as c
from ehrlake.views import sqltext as S
from ehrlake.views.definition import Select as SelectNode
from ehrlake.views.definition import ViewColumn, ViewDefinition
from ehrlake.views.sqltext import Expr

ISSUES = "conformance_issues"
REPEAT_DEPTH = 6  # nesting levels followed by repeat; deeper items are not reached (docs/sql_on_fhir.md)
_ISSUE = "_issue"  # per-row-part field carrying that part's problems


def resource_column(frame: DataFrame, column: str) -> Column:
    """The resources of ``column`` as VARIANT (JSON text is parsed; unparseable text gives NULL)."""
    dtype = frame.schema[column].dataType.simpleString()
    return F.col(column) if dtype == "variant" else F.try_parse_json(F.col(column))


@dataclass
class _Part:
    """Rows of one select node: an ``array<struct>`` column and the names of its fields."""

    rows: Expr
    names: list[str]


class _Builder:
    def __init__(self, scope: c.Scope, tolerant: bool):
        self.scope = scope
        self.tolerant = tolerant

    def path(self, node, focus: Expr, scope: c.Scope, at_root: bool = False) -> Expr:
        return c.Compiler(scope).compile(node, focus, at_root)

    # --- columns ----------------------------------------------------------------------------------
    def typed(self, value: Expr, col: ViewColumn) -> Expr:
        t = col.sql_type
        if t in ("date", "timestamp", "timestamp_ntz"):
            return c.as_string(value).try_cast(t)
        if t == "string":
            return c.as_string(value)
        return S.try_variant_get(value, "$", t)

    def value(self, col: ViewColumn, focus: Expr, scope: c.Scope, at_root: bool) -> Expr:
        """``struct<f0: value, f1: problem>``, the problem (tolerant mode) NULL when none; the path
        evaluated once. Read both fields inside one :func:`~ehrlake.views.compiler.let`: the struct
        is a higher-order function, which Spark never shares between two uses, so ``packed.f0``
        beside ``packed.f1`` would evaluate the whole path twice."""
        path_value = self.path(col.node, focus, scope, at_root)
        return c.let(
            lambda coll: S.struct(*(x.alias(f"f{i}") for i, x in enumerate(self._typed_value(col, coll)))),
            path_value,
        )

    def _typed_value(self, col: ViewColumn, coll: Expr) -> tuple[Expr, Expr]:
        label = f"{col.name} ({col.path})"
        if col.collection:
            values = S.transform(coll, lambda x: self.typed(x, col))
            bad = S.exists(coll, lambda x: self.typed(x, col).isNull())
            problem = S.when(bad, S.lit(f"{label}: a value is not a valid {col.type or col.sql_type}"))
            return values, problem
        v = c.first(coll)
        typed = self.typed(v, col)
        many = S.size(coll) > 1
        if not self.tolerant:
            message = f"view column {label} returned more than one value; declare it with collection: true"
            return S.when(many, S.raise_error(S.lit(message))).otherwise(typed), S.lit(None).cast("string")
        json_kind = S.lower(c.json_type(v))
        problem = S.when(
            v.isNotNull() & typed.isNull(),
            S.concat(
                S.lit(f"{label}: JSON "), json_kind, S.lit(f" is not a valid {col.type or col.sql_type}")
            ),
        ).when(many, S.lit(f"{label}: several values where one belongs (the first kept)"))
        return typed, problem

    # --- select tree ------------------------------------------------------------------------------
    def rows(self, sel: SelectNode, focus: Expr, row_index: Expr, at_root: bool) -> _Part:
        each = sel.for_each if sel.for_each is not None else sel.for_each_or_null
        if each is not None or sel.repeat:
            if each is not None:
                items = self.path(each, focus, dataclasses.replace(self.scope, row_index=row_index), at_root)
            else:
                items = self.repeat(sel.repeat, focus, row_index, at_root)
            names = self.names(sel)
            out = S.flatten(
                S.transform(items, lambda x, i: self.body(sel, c.one(self.scope, x), i, False).rows)
            )
            if sel.for_each_or_null is not None:
                out = S.when(S.size(items) == 0, self.body(sel, c.empty(), S.lit(0), False).rows).otherwise(
                    out
                )
            return _Part(out, names)
        return self.body(sel, focus, row_index, at_root)

    def repeat(self, paths: tuple, focus: Expr, row_index: Expr, at_root: bool) -> Expr:
        """Every node reachable through ``paths`` (depth-first, parents before children)."""
        scope = dataclasses.replace(self.scope, row_index=row_index)

        def children(coll: Expr, root: bool) -> Expr:
            return S.concat(*[self.path(p, coll, scope, root) for p in paths])

        def expand(coll: Expr, depth: int) -> Expr:
            if depth == 0:
                return coll
            return S.flatten(
                S.transform(
                    coll, lambda x: S.concat(S.array(x), expand(children(c.one(scope, x), False), depth - 1))
                )
            )

        return expand(children(focus, at_root), REPEAT_DEPTH)

    def names(self, sel: SelectNode) -> list[str]:
        return sel.column_names() + ([_ISSUE] if self.tolerant else [])

    def body(self, sel: SelectNode, focus: Expr, row_index: Expr, at_root: bool) -> _Part:
        scope = dataclasses.replace(self.scope, row_index=row_index)
        parts: list[_Part] = []
        if sel.columns or not (sel.selects or sel.union_all):
            packed = [self.value(col, focus, scope, at_root) for col in sel.columns]
            names = [col.name for col in sel.columns]

            def row(*values: Expr) -> Expr:
                fields = [v["f0"].alias(name) for v, name in zip(values, names, strict=True)]
                if self.tolerant:
                    problems = S.array(*[v["f1"] for v in values], S.lit(None).cast("string"))
                    fields.append(S.filter(problems, lambda p: p.isNotNull()).alias(_ISSUE))
                return S.struct(*fields)

            if not (packed or self.tolerant):
                parts.append(_Part(S.array(S.struct(S.lit(None).alias("_empty"))), ["_empty"]))
            else:  # tolerant: each column's value and problem read from one evaluation of its path
                one = c.let(row, *packed) if self.tolerant and packed else row(*packed)
                parts.append(_Part(S.array(one), names + ([_ISSUE] if self.tolerant else [])))
        for s in sel.selects:
            parts.append(self.rows(s, focus, row_index, at_root))
        if sel.union_all:
            branches = [self.rows(u, focus, row_index, at_root) for u in sel.union_all]
            parts.append(_Part(S.concat(*[b.rows for b in branches]), branches[0].names))
        acc = parts[0]
        for part in parts[1:]:
            acc = self.cross(acc, part)
        return acc

    def cross(self, a: _Part, b: _Part) -> _Part:
        """Every row of ``a`` beside every row of ``b`` (sibling selects)."""
        names = [n for n in a.names if n not in (_ISSUE, "_empty")] + [
            n for n in b.names if n not in (_ISSUE, "_empty")
        ]

        def merge(x: Expr, y: Expr) -> Expr:
            fields = [x[n].alias(n) for n in a.names if n not in (_ISSUE, "_empty")]
            fields += [y[n].alias(n) for n in b.names if n not in (_ISSUE, "_empty")]
            if self.tolerant:
                fields.append(S.concat(x[_ISSUE], y[_ISSUE]).alias(_ISSUE))
            return S.struct(*fields)

        rows = S.flatten(S.transform(a.rows, lambda x: S.transform(b.rows, lambda y: merge(x, y))))
        return _Part(rows, names + ([_ISSUE] if self.tolerant else []))


def _drift_issues(resource: Expr, drift: c.Drift | None) -> list[Expr]:
    if drift is None:
        return []
    out = []
    for new, olds in drift.renamed.items():
        for old in olds:
            present = S.variant_get(resource, c.path_of(old), "variant").isNotNull()
            absent = S.variant_get(resource, c.path_of(new), "variant").isNull()
            out.append(S.when(present & absent, S.lit(f"{old}: read as {new} (an older FHIR name)")))
    for name in drift.string_as_concept:
        v = S.variant_get(resource, c.path_of(name), "variant")
        out.append(
            S.when(
                c.json_type(v) == "STRING",
                S.lit(f"{name}: a string where R4 has a CodeableConcept (read as its code)"),
            )
        )
    return out


def _nodes(sel: SelectNode):
    yield sel
    for child in (*sel.selects, *sel.union_all):
        yield from _nodes(child)


def run(
    view: ViewDefinition,
    resources: DataFrame,
    column: str = "resource",
    keep: tuple[str, ...] = (),
    tolerant: bool = False,
    drift: c.Drift | None = None,
) -> DataFrame:
    """The view's rows over the resources in ``resources[column]`` (JSON text or VARIANT).

    ``keep`` columns of the input are carried beside each row (e.g. lineage); ``tolerant`` adds
    ``conformance_issues`` instead of failing (see the module docstring); ``drift`` is the resource
    type's known departures from R4.
    """
    if any(n.repeat for n in _nodes(view.root)):
        # each repeat level nests a few lambdas; Spark's analyzer resolves one level per iteration
        spark = resources.sparkSession
        if int(spark.conf.get("spark.sql.analyzer.maxIterations", "100")) < 500:
            spark.conf.set("spark.sql.analyzer.maxIterations", "500")
    resource = resource_column(resources, column)
    keep = tuple(k for k in keep if k not in view.column_names())  # a view column wins over a kept one
    frame = resources.select(*keep, resource.alias("_resource"))
    condition, rows, issues = (
        S.column(e) if e is not None else None for e in _compiled(view, tolerant, drift)
    )
    if all(not (n.for_each or n.for_each_or_null or n.repeat or n.union_all) for n in _nodes(view.root)):
        # one row per resource (every bronze view): no explode, so the projection stays small
        # enough for whole-stage code generation
        out = frame.where(condition).select(*keep, "_resource", F.get(rows, 0).alias("_row"))
    else:
        out = frame.where(condition).select(*keep, "_resource", F.explode(rows).alias("_row"))
    columns = [F.col(f"_row.{n}").alias(n) for n in view.column_names()]
    if tolerant:
        columns.append(issues.alias(ISSUES))
    return out.select(*keep, *columns)


_COMPILED: dict[tuple, tuple] = {}


def _compiled(view: ViewDefinition, tolerant: bool, drift: c.Drift | None) -> tuple[Expr, Expr, Expr | None]:
    """(resource filter, rows, drift issues) over ``_resource``, as SQL text (:mod:`sqltext`: no
    round trip to the JVM while building), built once per view and process."""
    key = (id(view), tolerant, id(drift))
    hit = _COMPILED.get(key)
    if hit is not None and hit[0] is view and hit[1] is drift:
        return hit[2]
    r = S.col("_resource")
    constants = {name: c.literal(value, kind) for name, (value, kind) in view.constants.items()}
    scope = c.Scope(constants, None, view.resource, drift, S.lit(0))
    root = scope.resource = c.one(scope, r)  # paths from the root read the resource itself
    builder = _Builder(scope, tolerant)
    condition = S.variant_get(r, "$.resourceType", "string") == view.resource
    if tolerant:  # an unparseable record stays, all null, for the caller to deal with (never dropped)
        condition = condition | r.isNull()
    for text, node in view.where:
        message = S.lit(f"view where path {text!r} gives a non-boolean value")

        def keep_row(value: Expr, msg: Expr = message) -> Expr:
            bad = value.isNotNull() & ~c.is_boolean(value)
            return S.coalesce(
                S.when(bad, S.raise_error(msg)).cast("boolean"), c.to_bool(S.array(value)), S.lit(False)
            )

        condition = condition & c.let(keep_row, c.first(builder.path(node, root, scope, True)))
    rows = builder.rows(view.root, root, S.lit(0), True).rows
    issues = None
    if tolerant:
        drifted = S.filter(
            S.array(*_drift_issues(r, drift), S.lit(None).cast("string")), lambda p: p.isNotNull()
        )
        issues = S.concat(drifted, S.col(f"_row.{_ISSUE}"))
    built = (condition, rows, issues)
    _COMPILED[key] = (view, drift, built)
    return built
