"""SQL over the lake as a role: ``ehrlake sql "SELECT ..." --role analyst``, the access policy enforced.

The statement names lake tables as ``layer.table`` (``silver.condition``, ``gold.eda_trends``). Before
anything runs, Spark's own parser reads it: only a query is accepted (no DDL, no writes, no settings,
no files by path), and every table it names is checked against the role, so a table the role may
not read is refused with one line, and audited, before a byte of it is read. Each table it may
read becomes the role's view of it (``views.RoleViews``), and the analysed statement goes through the
guard the SQL server uses (``guard``: nothing but those views read, no UDF, no reflection). The views
live only while the statement is analysed (the result keeps what they resolved to), so the session's
catalog is left as it was, where ``silver.condition`` is the whole table again
(``session.LAKE_CATALOG``). The statement, the role and the tables are one ``sql`` event in the
audit log, beside a ``read`` event of each table.

Reading Delta by SQL needs Delta Lake's JARs on Spark's class path (``make setup``), whichever
engine wrote the lake.
"""

from __future__ import annotations

import re

from pyspark.sql import DataFrame

from ehrlake.errors import AccessDenied, EhrlakeError, EnvironmentProblem
from ehrlake.lake.catalog import list_tables
from ehrlake.security.audit import Event
from ehrlake.sql import guard
from ehrlake.sql.views import RoleViews

_RELATION = re.compile(r"'UnresolvedRelation \[([^\]]*)\]")
_NOT_QUERIES = ("InsertIntoStatement", "UnresolvedIdentifier")  # writes and DDL that are no Command


def query(lake, statement: str, role: str) -> DataFrame:
    """``statement`` run as ``role`` over the lake's tables (see the module docstring); lazy: the
    caller decides how many rows to take."""
    from ehrlake.lake import _native

    spark = lake.spark
    if not _native.available(spark):
        raise EnvironmentProblem(
            "SQL over the lake reads Delta through Delta Lake's JARs, which are not on Spark's class "
            "path: `make setup` fetches them (the session loads them with lake.engine: native)"
        )
    access = lake.security.access if lake.security else None
    if access is None:
        raise EhrlakeError("this lake was opened without security (keys, access policy, audit log)")
    allowed = access.role(role, "sql")
    names = _tables_named(spark, statement)
    in_lake = {str(t) for t in list_tables(lake.root)}
    for name in names:
        if name not in in_lake or not allowed.may_read(name):
            access._deny(Event("sql", role=allowed.name, table_name=name, detail=statement[:2000]))
            why = "is not a table of this lake" if name not in in_lake else f"may not be read by role {role}"
            raise AccessDenied(f"{name} {why}")
    with RoleViews(lake, allowed) as views:
        views.add(names)
        for name in set(names) - set(views.views):  # a row-limited role's condition cannot apply
            access._deny(Event("sql", role=allowed.name, table_name=name, detail=allowed.rows_detail))
            raise allowed.rows_refusal(name)
        result = spark.sql(statement)  # analysed now: the frame keeps what the views resolved to
        reason = guard.violation(result, views.views)
        shown = dict(views.columns)
    event = Event("sql", role=allowed.name, table_name=",".join(names) or None, detail=statement[:2000])
    if reason:
        access._deny(event)
        raise AccessDenied(reason)
    # what each table showed the role, as a read through the policy records it; one commit
    reads = [
        Event("read", role=allowed.name, table_name=n, columns=shown[n], detail=allowed.rows_detail)
        for n in names
    ]
    access.audit.record(*reads, event)
    return result


def _tables_named(spark, statement: str) -> list[str]:
    """The ``layer.table`` names a read-only statement reads; anything else is refused here."""
    parser = spark._jsparkSession.sessionState().sqlParser()
    try:
        plan = parser.parsePlan(statement)
    except Exception as exc:  # Spark's ParseException: its first line says where
        raise EhrlakeError(f"not valid SQL: {str(exc).strip().splitlines()[0][:300]}") from None
    command = spark._jvm.org.apache.spark.util.Utils.classForName(
        "org.apache.spark.sql.catalyst.plans.logical.Command", True, False
    )
    tree = plan.treeString()
    if command.isInstance(plan) or any(node in tree for node in _NOT_QUERIES):
        raise AccessDenied(f"only queries run here, not {plan.getClass().getSimpleName()}")
    names = []
    for found in _RELATION.findall(tree):
        parts = [p.strip() for p in found.split(",")]
        if len(parts) == 1:
            continue  # a name defined in the statement itself (WITH c AS ...); nothing else has one
        name = ".".join(parts)
        if len(parts) != 2 or parts[0].startswith("_ehrlake_") or "/" in name:
            raise AccessDenied(f"{name} is not a table of this lake (name tables as layer.table)")
        if name not in names:
            names.append(name)
    return names
