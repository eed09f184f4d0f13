"""SQL over the lake as a role: ``ehrlake sql "SELECT ..." --role analyst``, the access policy enforced.

The statement names lake tables as ``layer.table`` (``silver.condition``, ``gold.eda_trends``). Before
anything runs, Spark's own parser reads it: only a query is accepted (no DDL, no writes, no settings,
no files by path), and every table it names is checked against the role, so a table the role may
not read is refused with one line, and audited, before a byte of it is read. Each table it may
read becomes a view under its own name holding exactly the columns the policy shows that role
(hidden and, by policy, sealed columns are not there); the view reads a Delta table registered
under a name this process makes up and never accepts in a statement. The views live only while the
statement is analysed (the result keeps what they resolved to), so the session's catalog is left as it
was, where ``silver.condition`` is the whole table again (``session.LAKE_CATALOG``). The statement,
the role and the tables are one ``sql`` event in the audit log, beside the ``read`` event of each table.

Reading Delta by SQL needs Delta Lake's JARs on Spark's class path (``make setup``), whichever
engine wrote the lake.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid

from pyspark.sql import DataFrame

from ehrlake.errors import AccessDenied, EhrlakeError, EnvironmentProblem
from ehrlake.lake.catalog import TableName, list_tables
from ehrlake.security.audit import Event

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
    registered = spark._jsparkSession.sessionState().catalog()  # what the catalog holds, not the lake
    taken = [layer for layer in {TableName.parse(n).layer for n in names} if registered.databaseExists(layer)]
    if taken:
        raise EnvironmentProblem(
            f"the session's catalog has a database {taken[0]} of its own (a shared metastore?), whose "
            "tables would be read past the access policy: run `ehrlake sql` on the embedded catalog"
        )
    hidden = f"_ehrlake_{uuid.uuid4().hex}"
    location = tempfile.mkdtemp(prefix="ehrlake-sql-")
    made = [hidden]
    try:
        spark.sql(f"CREATE DATABASE {hidden} LOCATION '{location}/{hidden}'")
        for name in names:
            table = TableName.parse(name)
            shown = access.read(lake, name, allowed.name).columns  # the policy's columns; a read event
            stored = f"{hidden}.{table.layer}__{table.table}"
            spark.sql(f"CREATE TABLE {stored} USING delta LOCATION '{lake.path(name)}'")
            if table.layer not in made:
                spark.sql(f"CREATE DATABASE {table.layer} LOCATION '{location}/{table.layer}'")
                made.append(table.layer)
            columns = ", ".join(f"`{c}`" for c in shown)
            spark.sql(f"CREATE VIEW {name} AS SELECT {columns} FROM {stored}")
        access.audit.record(
            Event("sql", role=allowed.name, table_name=",".join(names) or None, detail=statement[:2000])
        )
        return spark.sql(statement)  # analysed now: the frame keeps what the views resolved to
    finally:
        for database in reversed(made):  # the session's catalog as it was, for whatever runs next
            spark.sql(f"DROP DATABASE IF EXISTS {database} CASCADE")
        shutil.rmtree(location, ignore_errors=True)


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
