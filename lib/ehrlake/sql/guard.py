"""The access policy inside Spark: Python's side of ``ehrlake.PolicyGuard`` (infra/spark).

The guard is a Spark session extension. Every plan a client's session analyses must only read the
role's views (``views.RoleViews``) or data the client sent, and run no code of the client's (no
command, no UDF, no reflection, no script); anything else fails at analysis, before a byte is
read. Each client operation, with its statement, the views it read and its outcome, is queued for
:func:`drain`, which the SQL server writes to the audit log. ``ehrlake sql`` puts its one statement
through the same check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ehrlake.errors import EnvironmentProblem


@dataclass(frozen=True)
class GuardEvent:
    """One operation of a client's: it ran (``allowed``), was refused (``denied``, with why) or failed
    (``failed``: Spark's error, e.g. a name not found)."""

    outcome: str
    views: tuple[str, ...]
    statement: str
    reason: str | None


def _guard(spark):
    from ehrlake.session import POLICY_GUARD, loads

    if not loads(spark._jvm, POLICY_GUARD):
        raise EnvironmentProblem(
            "the access policy's guard for SQL (infra/spark) is not on Spark's class path: `make setup` "
            "compiles it beside Delta Lake's JARs (it needs a JDK's javac)"
        )
    return spark._jvm.ehrlake.PolicyGuard


def violation(df, views: list[str]) -> str | None:
    """Why running ``df`` would break the policy for a role reading ``views``, or None."""
    plan = df._jdf.queryExecution().analyzed()
    return _guard(df.sparkSession).violation(plan, _strings(df.sparkSession, views))


def arm(spark, views: list[str]) -> None:
    """Check every session but ``spark``'s own (the server's, trusted) against ``views`` from now on;
    called again with more views when tables appear."""
    _guard(spark).arm(_strings(spark, views), spark._jsparkSession)


def listen(spark) -> None:
    """Record Spark Connect's operations (statement and outcome) as events for :func:`drain`."""
    _guard(spark).listen(spark.sparkContext._jsc.sc())


def disarm(spark) -> None:
    """Check nothing any more (the server stopped)."""
    _guard(spark).disarm()


def drain(spark) -> list[GuardEvent]:
    """The guard's events since the last call, oldest first."""
    return [
        GuardEvent(e[0], tuple(v for v in (e[1] or "").split(",") if v), statement(e[2]), e[3])
        for e in _guard(spark).drain()
    ]


_SQL = re.compile(r'^sql_command \{.*?\bquery: "((?:[^"\\]|\\.)*)"', re.DOTALL)


def statement(request: str) -> str:
    """The SQL a client sent (Spark Connect reports a ``spark.sql`` call as its request in protobuf's
    text format, escapes and all); a DataFrame's plan as reported."""
    found = _SQL.match(request or "")
    if not found:
        return request
    escaped = found[1].encode("latin-1", "backslashreplace")
    return escaped.decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def _strings(spark, values: list[str]):
    array = spark.sparkContext._gateway.new_array(spark._jvm.java.lang.String, len(values))
    for i, value in enumerate(values):
        array[i] = value
    return array
