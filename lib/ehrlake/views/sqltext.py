"""Spark SQL expressions built as text, with the part of pyspark's Column and functions API that the
FHIRPath compiler uses (``F.when``, ``F.transform`` with a Python lambda, ``col.isNotNull()``, ...).

Why: pyspark builds a Column by round trips to the JVM, several per function, operator and lambda.
A bronze view's expression took about 13,000 of them: 0.5-2 s per view, ~20 s for the 26 bronze
views, in every process that types FHIR (an ingest of two records paid it in full). Built as text,
the compiler is plain Python, and the JVM parses each finished expression once (:func:`column`).
The text is ordinary Spark SQL, so a plan prints the same functions the compiler wrote.
"""

from __future__ import annotations

import inspect
import itertools

from pyspark.sql import Column
from pyspark.sql import functions as _spark

_names = itertools.count()


class Expr:
    """One SQL expression (``sql``), with the name :meth:`alias` gave it (used by :func:`struct`)."""

    __slots__ = ("sql", "name")

    def __init__(self, sql: str, name: str | None = None):
        self.sql = sql
        self.name = name

    def __repr__(self) -> str:
        return f"Expr({self.sql!r})"

    def __bool__(self):
        raise TypeError("a SQL expression has no truth value here: use & | ~, not and / or / not")

    # --- operators ----------------------------------------------------------------------------------
    def _op(self, op: str, other, reverse: bool = False) -> Expr:
        a, b = (text(other), self.sql) if reverse else (self.sql, text(other))
        return Expr(f"({a} {op} {b})")

    def __eq__(self, other) -> Expr:  # type: ignore[override]
        return self._op("=", other)

    def __ne__(self, other) -> Expr:  # type: ignore[override]
        return self._op("!=", other)

    __hash__ = object.__hash__  # identity, as for a Column (the scope keys collections by id)

    def __lt__(self, other) -> Expr:
        return self._op("<", other)

    def __le__(self, other) -> Expr:
        return self._op("<=", other)

    def __gt__(self, other) -> Expr:
        return self._op(">", other)

    def __ge__(self, other) -> Expr:
        return self._op(">=", other)

    def __and__(self, other) -> Expr:
        return self._op("AND", other)

    def __or__(self, other) -> Expr:
        return self._op("OR", other)

    def __invert__(self) -> Expr:
        return Expr(f"(NOT {self.sql})")

    def __neg__(self) -> Expr:
        return Expr(f"(- {self.sql})")

    def __add__(self, other) -> Expr:
        return self._op("+", other)

    def __radd__(self, other) -> Expr:
        return self._op("+", other, reverse=True)

    def __sub__(self, other) -> Expr:
        return self._op("-", other)

    def __rsub__(self, other) -> Expr:
        return self._op("-", other, reverse=True)

    def __mul__(self, other) -> Expr:
        return self._op("*", other)

    def __rmul__(self, other) -> Expr:
        return self._op("*", other, reverse=True)

    def __truediv__(self, other) -> Expr:
        return self._op("/", other)

    # --- methods ------------------------------------------------------------------------------------
    def isNull(self) -> Expr:  # noqa: N802 - pyspark's name
        return Expr(f"({self.sql} IS NULL)")

    def isNotNull(self) -> Expr:  # noqa: N802 - pyspark's name
        return Expr(f"({self.sql} IS NOT NULL)")

    def alias(self, name: str) -> Expr:
        return Expr(self.sql, name)

    def cast(self, sql_type: str) -> Expr:
        return Expr(f"CAST({self.sql} AS {sql_type})")

    def try_cast(self, sql_type: str) -> Expr:
        return Expr(f"TRY_CAST({self.sql} AS {sql_type})")

    def contains(self, other) -> Expr:
        return call("contains", self, other)

    def startswith(self, other) -> Expr:
        return call("startswith", self, other)

    def endswith(self, other) -> Expr:
        return call("endswith", self, other)

    def rlike(self, pattern: str) -> Expr:
        return Expr(f"({self.sql} RLIKE {text(pattern)})")

    def isin(self, *values) -> Expr:
        if len(values) == 1 and isinstance(values[0], list | tuple | set):
            values = tuple(values[0])
        return Expr(f"({self.sql} IN ({', '.join(text(v) for v in values)}))")

    def __getitem__(self, field: str) -> Expr:
        if not isinstance(field, str):
            raise TypeError("only a struct's field is read by name here")
        return Expr(f"({self.sql}).{quote(field)}")


class _Case(Expr):
    """``CASE WHEN ... END`` that grows with :meth:`when` and closes with :meth:`otherwise`."""

    __slots__ = ("arms",)

    def __init__(self, arms: str):
        self.arms = arms  # ``WHEN c THEN v ...``: a further arm is appended, the others not re-written
        super().__init__(f"CASE {arms} END")

    def when(self, condition, value) -> _Case:
        return _Case(f"{self.arms} {_arm(condition, value)}")

    def otherwise(self, value) -> Expr:
        return Expr(f"CASE {self.arms} ELSE {text(value)} END")


def _arm(condition, value) -> str:
    return f"WHEN {text(condition)} THEN {text(value)}"


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def text(value) -> str:
    """A value as SQL: an expression's text, or a Python value as a literal (as ``F.lit`` types it)."""
    if isinstance(value, Expr):
        return value.sql
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value) if -(2**31) <= value < 2**31 else f"{value}L"
    if isinstance(value, float):
        return f"CAST('{value!r}' AS DOUBLE)"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"no SQL literal for {type(value).__name__}")


def column(expr: Expr) -> Column:
    """The expression as a pyspark Column (parsed by the JVM once)."""
    return _spark.expr(expr.sql)


# --- functions ----------------------------------------------------------------------------------------
def call(name: str, *args) -> Expr:
    return Expr(f"{name}({', '.join(text(a) for a in args)})")


def call_function(name: str, *args) -> Expr:
    return call(name, *args)


def lit(value) -> Expr:
    return Expr(text(value))


def col(name: str) -> Expr:
    return Expr(".".join(quote(part) for part in name.split(".")))


def when(condition, value) -> _Case:
    return _Case(_arm(condition, value))


def struct(*fields: Expr) -> Expr:
    if any(f.name is None for f in fields):
        raise ValueError("every field of a struct needs a name (alias)")
    return call("named_struct", *[x for f in fields for x in (f.name, f)])


def _lambda(fn) -> str:
    params = [f"_lv{next(_names)}" for _ in inspect.signature(fn).parameters]
    body = fn(*[Expr(p) for p in params])
    head = params[0] if len(params) == 1 else "(" + ", ".join(params) + ")"
    return f"{head} -> {text(body)}"


def _higher_order(name: str):
    def apply(array: Expr, fn) -> Expr:
        return Expr(f"{name}({text(array)}, {_lambda(fn)})")

    apply.__name__ = name
    return apply


transform = _higher_order("transform")
filter = _higher_order("filter")  # noqa: A001 - pyspark's name
exists = _higher_order("exists")
forall = _higher_order("forall")


def _function(name: str):
    def apply(*args) -> Expr:
        return call(name, *args)

    apply.__name__ = name
    return apply


array = _function("array")
coalesce = _function("coalesce")
concat = _function("concat")
flatten = _function("flatten")
size = _function("size")
get = _function("get")
slice = _function("slice")  # noqa: A001 - pyspark's name
greatest = _function("greatest")
variant_get = _function("variant_get")
try_variant_get = _function("try_variant_get")
is_variant_null = _function("is_variant_null")
schema_of_variant = _function("schema_of_variant")
parse_json = _function("parse_json")
to_json = _function("to_json")
lower = _function("lower")
upper = _function("upper")
trim = _function("trim")
length = _function("length")
instr = _function("instr")
regexp_extract = _function("regexp_extract")
substring_index = _function("substring_index")
startswith = _function("startswith")
endswith = _function("endswith")
contains = _function("contains")
rpad = _function("rpad")
pow = _function("pow")  # noqa: A001 - pyspark's name
floor = _function("floor")
try_divide = _function("try_divide")
try_mod = _function("try_mod")
to_date = _function("to_date")
last_day = _function("last_day")
date_format = _function("date_format")
raise_error = _function("raise_error")
