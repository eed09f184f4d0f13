"""FHIRPath -> Spark column expressions over resources parsed as VARIANT (no Python per row).

Every FHIRPath value is a *collection*, compiled to a column of type ``array<variant>``: navigation
flattens arrays (``name.given`` is every given name of every name), a missing element or JSON
``null`` is the empty collection, and functions and operators follow FHIRPath's singleton rules
(an empty operand gives an empty result). Because VARIANT keeps each value's own JSON type, a field
that drifted from R4 (a string where a CodeableConcept belongs, a number where a string belongs)
never fails a parse: it simply does not navigate, and the view runner records the problem.

Choice types resolve by name: ``value.ofType(Quantity)`` reads ``valueQuantity``. Known drifts of
real exports (:class:`Drift`, from ``conf/views/drift.yaml``) are applied when navigating from the
resource root, so an STU3 ``context`` reads as ``encounter``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ehrlake.views import fhirpath as fp
from ehrlake.views import sqltext as F  # pyspark's functions, written as SQL text (see sqltext)
from ehrlake.views.fhirpath import FhirPathError
from ehrlake.views.sqltext import Expr

VARIANTS = "array<variant>"
_SIMPLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# FHIR primitive types -> the JSON (variant) types their values may have
_STRING_TYPES = {
    "string", "code", "id", "uri", "url", "canonical", "markdown", "oid", "uuid", "base64Binary",
    "date", "dateTime", "instant", "time", "xhtml",
}  # fmt: skip
_INTEGER_TYPES = {"integer", "positiveInt", "unsignedInt", "integer64"}
_INTEGER_SCHEMAS = ("BIGINT", "INT", "SMALLINT", "TINYINT")
_TYPED_REFERENCE = r"([A-Za-z]+)/([^/?]+)(/_history/[^/]+)?$"  # Patient/1, .../Patient/1/_history/2


def empty() -> Expr:
    return F.array().cast(VARIANTS)


def path_of(name: str) -> str:
    """A variant path selecting one object field."""
    return f"$.{name}" if _SIMPLE_NAME.match(name) else "$[" + json.dumps(name) + "]"


def as_collection(value: Expr) -> Expr:
    """One variant (maybe a JSON array, JSON null or SQL NULL) as a FHIRPath collection. (FHIR JSON
    has no nulls inside arrays, save the ``_element`` extension arrays, which paths do not reach.)"""

    # bound once: every member step of every path comes here, and ``value`` is a variant_get that
    # copies its part of the record (read three times, Observation typing took 15% longer)
    def collection(v: Expr) -> Expr:
        present = F.when(v.isNotNull() & ~F.is_variant_null(v), F.array(v))
        return F.coalesce(F.try_variant_get(v, "$", VARIANTS), present, empty())

    return let(collection, value)


def let(fn, *values: Expr) -> Expr:
    """``fn`` of ``values``, each evaluated once: Spark SQL has no LET, and a compiled path used
    several times in one expression would otherwise be copied (and analysed) once per use."""
    if len(values) == 1:  # no struct around one value (a step of every path comes here); ``fn``
        # wrapped, as transform would pass an index to a second parameter (one with a default)
        return F.get(F.transform(F.array(values[0]), lambda v: fn(v)), 0)
    packed = F.array(F.struct(*[v.alias(f"v{i}") for i, v in enumerate(values)]))
    return F.get(F.transform(packed, lambda s: fn(*[s[f"v{i}"] for i in range(len(values))])), 0)


def navigate(coll: Expr, name: str) -> Expr:
    return F.flatten(F.transform(coll, lambda x: as_collection(F.variant_get(x, path_of(name), "variant"))))


def one(scope: Scope, item: Expr) -> Expr:
    """``[item]``, a collection of one, recorded in ``scope`` so member paths from it can read the item
    directly (see :func:`_walk`)."""
    coll = F.array(item)
    scope.items[id(coll)] = (coll, item)
    return coll


def _member_chain(node: fp.Member) -> tuple[list, object | None]:
    """``a.b.ofType(T).first().c`` -> its steps in order (a name, or None for ``first()``) and the
    node below them."""
    steps: list = []
    while True:
        if isinstance(node, fp.Member):
            steps.append(node.name)
            node = node.target
        elif _is_choice(node):
            t = node.args[0].value
            steps.append(node.target.name + t[0].upper() + t[1:])
            node = node.target.target
        elif isinstance(node, fp.Call) and node.name == "first" and not node.args and node.target is not None:
            steps.append(None)
            node = node.target
        else:
            return steps[::-1], node


def _is_choice(node) -> bool:
    """``x.ofType(T)`` where ``x`` is a member: a choice element, read by its typed name."""
    return (
        isinstance(node, fp.Call)
        and node.name == "ofType"
        and isinstance(node.target, fp.Member)
        and len(node.args) == 1
        and isinstance(node.args[0], fp.Literal)
        and node.args[0].kind == "type"
    )


def _over(coll: Expr, steps: list) -> Expr:
    """The collection ``steps`` reach from every item of ``coll``; a ``first()`` takes the first of
    everything before it, so the steps after the last one start from (at most) one item."""
    if None in steps:
        k = len(steps) - 1 - steps[::-1].index(None)
        head, steps = steps[:k], steps[k + 1 :]
        coll = F.slice(_over(coll, head) if head else coll, 1, 1)
    if not steps:
        return coll
    if len(steps) == 1:
        return navigate(coll, steps[0])
    return F.flatten(F.transform(coll, lambda x: _walk(x, steps)))


def _walk(item: Expr, steps: list) -> Expr:
    """The collection ``steps`` reach from one item. Tried first as one deep variant path
    (``code.coding.first().code`` as ``$.code.coding[0].code``), which is right whenever it finds a
    value: every step before then met an object, and every ``first()`` an array. Only when it finds
    nothing (a step absent, a repeating element on the way, a drifted shape) are the steps walked one
    by one. Each step is higher-order functions that Spark evaluates interpreted, so most columns'
    paths cost one lookup instead of several."""
    steps = [s for i, s in enumerate(steps) if s is not None or (i > 0 and steps[i - 1] is not None)]
    if not steps:
        return F.array(item)
    if len(steps) == 1:
        return as_collection(F.variant_get(item, path_of(steps[0]), "variant"))

    def stepwise() -> Expr:
        coll = F.array(item)
        for step in steps:
            coll = F.slice(coll, 1, 1) if step is None else navigate(coll, step)
        return coll

    deep = "$" + "".join("[0]" if s is None else path_of(s)[1:] for s in steps)
    return let(
        lambda v: F.when(v.isNotNull(), as_collection(v)).otherwise(stepwise()),
        F.variant_get(item, deep, "variant"),
    )


def first(coll: Expr) -> Expr:
    """The first item as a variant, NULL for the empty collection."""
    return F.get(coll, 0)


def as_string(value: Expr) -> Expr:
    return F.try_variant_get(value, "$", "string")


def json_type(value: Expr) -> Expr:
    return F.schema_of_variant(value)


def is_boolean(value: Expr) -> Expr:
    return json_type(value) == "BOOLEAN"


def to_bool(coll: Expr) -> Expr:
    """A collection as a three-valued SQL boolean: NULL when empty or not a boolean."""
    return let(lambda v: F.when(is_boolean(v), F.try_variant_get(v, "$", "boolean")), first(coll))


def from_bool(b: Expr) -> Expr:
    return F.when(b.isNull(), empty()).otherwise(F.array(b.cast("variant")))


def from_scalar(value: Expr) -> Expr:
    """A SQL scalar (NULL: empty) as a collection."""
    return F.when(value.isNull(), empty()).otherwise(F.array(value.cast("variant")))


def literal(value, kind: str = "") -> Expr:
    if value is None:
        return empty()
    return F.array(F.lit(value).cast("variant"))


def _is_number(v: Expr) -> Expr:
    t = json_type(v)
    return t.isin(*_INTEGER_SCHEMAS, "DOUBLE", "FLOAT") | t.startswith("DECIMAL")


def _is_integer(v: Expr) -> Expr:
    t = json_type(v)
    return t.isin(*_INTEGER_SCHEMAS) | (t.startswith("DECIMAL(") & t.endswith(",0)"))


def has_type(v: Expr, type_name: str) -> Expr | None:
    """Whether a variant can be a value of FHIR type ``type_name``; None when the JSON type cannot
    tell (complex types are objects)."""
    t = json_type(v)
    if type_name in _STRING_TYPES:
        return t == "STRING"
    if type_name in _INTEGER_TYPES:
        return _is_integer(v)
    if type_name == "decimal":
        return _is_number(v)
    if type_name == "boolean":
        return t == "BOOLEAN"
    return None


_LOGIC = ("and", "or", "xor", "implies")
_COMPARISON = ("=", "!=", "~", "!~", "<", ">", "<=", ">=", "in", "contains")
_BOOLEAN_CALLS = ("exists", "empty", "not", "all", "hasValue")


def _logic(op: str, a: Expr, b: Expr) -> Expr:
    """FHIRPath's three-valued and / or / xor / implies over SQL booleans (NULL: empty)."""
    false, true = F.lit(False), F.lit(True)
    if op == "and":
        return F.when((a == false) | (b == false), false).when(a & b, true)
    if op == "or":
        return F.when((a == true) | (b == true), true).when(~a & ~b, false)
    if op == "xor":
        return a != b
    return F.when(a == false, true).when(b == true, true).when(a & ~b, false)


@dataclass(frozen=True)
class Drift:
    """Known departures from R4 of one resource type, read as R4 when navigating from its root."""

    renamed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # R4 name -> older names
    string_as_concept: tuple[str, ...] = ()  # CodeableConcept fields some exporters write as strings


def _concept_from_string(v: Expr) -> Expr:
    """A plain string where a CodeableConcept belongs -> ``{"coding": [{"code": s}], "text": s}``."""
    s = as_string(v)
    obj = F.to_json(F.struct(F.array(F.struct(s.alias("code"))).alias("coding"), s.alias("text")))
    return F.when(json_type(v) == "STRING", F.parse_json(obj)).otherwise(v)


@dataclass
class Scope:
    """What a path may refer to besides its focus: constants (``%name``), the resource (``%resource``),
    the row index of the enclosing forEach/repeat (``%rowIndex``) and the resource type's drifts."""

    constants: dict[str, Expr] = field(default_factory=dict)
    resource: Expr | None = None
    resource_type: str | None = None
    drift: Drift | None = None
    row_index: Expr | None = None
    items: dict = field(default_factory=dict)  # collections of one item (:func:`one`), by id


class Compiler:
    """Compiles one parsed expression against a focus collection."""

    def __init__(self, scope: Scope):
        self.scope = scope

    # --- entry point ------------------------------------------------------------------------------
    def compile(self, node, focus: Expr, at_root: bool = False) -> Expr:
        method = getattr(self, f"_{type(node).__name__.lower()}")
        return method(node, focus, at_root)

    # --- terms ------------------------------------------------------------------------------------
    def _literal(self, node: fp.Literal, focus, at_root) -> Expr:
        if node.kind == "type":
            raise FhirPathError(f"a type name ({node.value}) is only allowed after is / as / ofType")
        return literal(node.value, node.kind)

    def _constant(self, node: fp.Constant, focus, at_root) -> Expr:
        if node.name == "rowIndex":
            return from_scalar(self.scope.row_index if self.scope.row_index is not None else F.lit(0))
        if node.name in ("resource", "rootResource"):
            if self.scope.resource is None:
                raise FhirPathError(f"%{node.name} is not available here")
            return self.scope.resource
        if node.name not in self.scope.constants:
            raise FhirPathError(f"undefined constant %{node.name}")
        return self.scope.constants[node.name]

    def _this(self, node, focus, at_root) -> Expr:
        return focus

    def _member(self, node: fp.Member, focus, at_root) -> Expr:
        steps, below = _member_chain(node)
        if below is None or isinstance(below, fp.This):
            base, root = focus, at_root
            if root and below is None and steps[0] == self.scope.resource_type:
                steps = steps[1:]  # Patient.name: the leading type names the resource itself
        else:
            base, root = self.compile(below, focus, at_root), False
        drift = self.scope.drift
        if root and drift and steps and (steps[0] in drift.renamed or steps[0] in drift.string_as_concept):
            base, steps = self.navigate(base, steps[0], True), steps[1:]  # read as R4 first
        if not steps:
            return base
        single = self.scope.items.get(id(base))
        return _walk(single[1], steps) if single is not None and single[0] is base else _over(base, steps)

    def navigate(self, base: Expr, name: str, at_root: bool) -> Expr:
        out = navigate(base, name)
        drift = self.scope.drift
        if not at_root or drift is None:
            return out
        for old in drift.renamed.get(name, ()):
            out = F.when(F.size(out) > 0, out).otherwise(navigate(base, old))
        if name in drift.string_as_concept:
            out = F.transform(out, _concept_from_string)
        return out

    def _index(self, node: fp.Index, focus, at_root) -> Expr:
        coll = self.compile(node.target, focus, at_root)
        i = F.try_variant_get(first(self.compile(node.index, focus, at_root)), "$", "int")
        return F.when(i >= 0, F.slice(coll, i + 1, F.lit(1))).otherwise(empty())

    def _unary(self, node: fp.Unary, focus, at_root) -> Expr:
        coll = self.compile(node.operand, focus, at_root)
        if node.op == "+":
            return coll
        return let(
            lambda v: F.when(_is_integer(v), from_scalar(-F.try_variant_get(v, "$", "bigint"))).otherwise(
                from_scalar(-F.try_variant_get(v, "$", "double"))
            ),
            first(coll),
        )

    # --- booleans: compiled straight to three-valued SQL booleans (NULL = empty) ---------------------
    def is_boolean_node(self, node) -> bool:
        if isinstance(node, fp.Binary):
            return node.op in _LOGIC or node.op in _COMPARISON
        if isinstance(node, fp.Call):
            return node.name in _BOOLEAN_CALLS
        return isinstance(node, fp.Literal) and node.kind == "boolean"

    def compile_bool(self, node, focus: Expr, at_root: bool = False) -> Expr:
        """``node`` as a SQL boolean: NULL when it is empty or not a boolean (FHIRPath's singleton
        evaluation); no round trip through a collection for what is a boolean anyway."""
        if isinstance(node, fp.Literal) and node.kind == "boolean":
            return F.lit(bool(node.value))
        if isinstance(node, fp.Binary) and node.op in _LOGIC:
            a = self.compile_bool(node.left, focus, at_root)
            b = self.compile_bool(node.right, focus, at_root)
            return let(lambda x, y: _logic(node.op, x, y), a, b)
        if isinstance(node, fp.Binary) and node.op in _COMPARISON:
            left = self.compile(node.left, focus, at_root)
            right = self.compile(node.right, focus, at_root)
            return let(lambda lc, rc: self._compare(node.op, lc, rc), left, right)
        if isinstance(node, fp.Call) and node.name in _BOOLEAN_CALLS:
            return self._bool_call(node, focus, at_root)
        return to_bool(self.compile(node, focus, at_root))

    def _bool_call(self, node: fp.Call, focus, at_root) -> Expr:
        name, args = node.name, node.args
        if name == "not":
            self._arity(node, 0)
            target = node.target if node.target is not None else fp.This()
            return ~self.compile_bool(target, focus, at_root)
        base = focus if node.target is None else self.compile(node.target, focus, at_root)
        if name == "empty":
            self._arity(node, 0)
            return F.size(base) == 0
        if name == "hasValue":
            return F.size(base) == 1
        if not args:
            return F.size(base) > 0 if name == "exists" else F.lit(True)

        def pred(x: Expr) -> Expr:
            return F.coalesce(self.compile_bool(args[0], one(self.scope, x)), F.lit(False))

        return F.exists(base, pred) if name == "exists" else F.forall(base, pred)

    def _compare(self, op: str, left: Expr, right: Expr) -> Expr:
        if op in ("in", "contains"):
            item, coll = (left, right) if op == "in" else (right, left)
            key = F.to_json(first(item))
            return F.when(F.size(item) > 0, F.exists(coll, lambda y: F.to_json(y) == key))
        lv, rv = first(left), first(right)
        both = lv.isNotNull() & rv.isNotNull()
        if op in ("=", "!=", "~", "!~"):
            same = F.to_json(lv) == F.to_json(rv)
            if op in ("~", "!~"):
                same = F.lower(F.coalesce(as_string(lv), F.to_json(lv))) == F.lower(
                    F.coalesce(as_string(rv), F.to_json(rv))
                )
            return F.when(both, same if op in ("=", "~") else ~same)
        ln, rn = F.try_variant_get(lv, "$", "double"), F.try_variant_get(rv, "$", "double")
        numeric = _is_number(lv) & _is_number(rv)
        ls, rs = as_string(lv), as_string(rv)
        compare = {
            "<": lambda a, b: a < b,
            ">": lambda a, b: a > b,
            "<=": lambda a, b: a <= b,
            ">=": lambda a, b: a >= b,
        }[op]
        return F.when(both & numeric, compare(ln, rn)).when(both, compare(ls, rs))

    # --- operators --------------------------------------------------------------------------------
    def _binary(self, node: fp.Binary, focus, at_root) -> Expr:
        op = node.op
        if self.is_boolean_node(node):
            return from_bool(self.compile_bool(node, focus, at_root))
        left = self.compile(node.left, focus, at_root)
        if op in ("is", "as"):
            return self._type_op(left, node.right.value, op)
        right = self.compile(node.right, focus, at_root)
        if op == "|":  # each side used once: no need to bind them
            return F.concat(left, right)
        return let(lambda lc, rc: self._operate(op, lc, rc), left, right)

    def _operate(self, op: str, left: Expr, right: Expr) -> Expr:
        lv, rv = first(left), first(right)
        both = lv.isNotNull() & rv.isNotNull()
        if op == "&":
            return from_scalar(
                F.concat(F.coalesce(as_string(lv), F.lit("")), F.coalesce(as_string(rv), F.lit("")))
            )
        return self._arithmetic(op, lv, rv, both)

    def _arithmetic(self, op: str, lv: Expr, rv: Expr, both: Expr) -> Expr:
        ln, rn = F.try_variant_get(lv, "$", "double"), F.try_variant_get(rv, "$", "double")
        li, ri = F.try_variant_get(lv, "$", "bigint"), F.try_variant_get(rv, "$", "bigint")
        ints = _is_integer(lv) & _is_integer(rv)
        numeric = _is_number(lv) & _is_number(rv)
        if op == "+":
            strings = (json_type(lv) == "STRING") & (json_type(rv) == "STRING")
            return (
                F.when(both & ints, from_scalar(li + ri))
                .when(both & numeric, from_scalar(ln + rn))
                .when(both & strings, from_scalar(F.concat(as_string(lv), as_string(rv))))
                .otherwise(empty())
            )
        if op == "-":
            return (
                F.when(both & ints, from_scalar(li - ri))
                .when(both & numeric, from_scalar(ln - rn))
                .otherwise(empty())
            )
        if op == "*":
            return (
                F.when(both & ints, from_scalar(li * ri))
                .when(both & numeric, from_scalar(ln * rn))
                .otherwise(empty())
            )
        if op == "/":
            return F.when(both & numeric, from_scalar(F.try_divide(ln, rn))).otherwise(empty())
        if op == "div":
            return F.when(both & ints, from_scalar(F.floor(F.try_divide(li, ri)).cast("bigint"))).otherwise(
                empty()
            )
        if op == "mod":
            return F.when(both & ints, from_scalar(F.try_mod(li, ri))).otherwise(empty())
        raise FhirPathError(f"operator {op} is not supported")

    def _type_op(self, coll: Expr, type_name: str, op: str) -> Expr:
        test = has_type(first(coll), type_name)
        if test is None:
            raise FhirPathError(f"'{op} {type_name}' is supported for primitive types only")
        if op == "is":
            return F.when(F.size(coll) == 0, empty()).otherwise(from_bool(F.coalesce(test, F.lit(False))))
        return F.filter(coll, lambda x: F.coalesce(has_type(x, type_name), F.lit(False)))

    # --- functions --------------------------------------------------------------------------------
    def _call(self, node: fp.Call, focus, at_root) -> Expr:
        name, args = node.name, node.args
        if name == "ofType":
            return self._of_type(node, focus, at_root)
        if name == "getResourceKey":
            self._arity(node, 0)
            return self.compile(fp.Member(node.target, "id"), focus, at_root)
        if name == "getReferenceKey":  # the reference read as a member of the path before it
            return self._reference_key(
                self.compile(fp.Member(node.target, "reference"), focus, at_root), node.args
            )
        if name in _BOOLEAN_CALLS:
            return from_bool(self._bool_call(node, focus, at_root))
        base = focus if node.target is None else self.compile(node.target, focus, at_root)
        if name == "where":
            self._arity(node, 1)
            return F.filter(
                base, lambda x: F.coalesce(self.compile_bool(args[0], one(self.scope, x)), F.lit(False))
            )
        if name == "select":
            self._arity(node, 1)
            return F.flatten(F.transform(base, lambda x: self.compile(args[0], one(self.scope, x))))
        if name == "count":
            return from_scalar(F.size(base).cast("bigint"))
        if name == "first":
            return F.slice(base, 1, 1)
        if name == "last":
            return F.when(F.size(base) > 0, F.slice(base, -1, 1)).otherwise(empty())
        if name == "tail":
            return F.when(F.size(base) > 1, F.slice(base, 2, F.size(base))).otherwise(empty())
        if name in ("skip", "take"):
            self._arity(node, 1)
            n = F.try_variant_get(first(self.compile(args[0], focus, at_root)), "$", "int")
            if name == "take":
                return F.when(n > 0, F.slice(base, 1, n)).otherwise(empty())
            return F.when(
                n < F.size(base), F.slice(base, F.greatest(n, F.lit(0)) + 1, F.size(base))
            ).otherwise(empty())
        if name == "join":
            sep = F.lit("") if not args else as_string(first(self.compile(args[0], focus, at_root)))
            return from_scalar(F.call_function("array_join", F.transform(base, as_string), sep))
        if name == "extension":
            self._arity(node, 1)
            url = as_string(first(self.compile(args[0], focus, at_root)))
            return F.filter(
                navigate(base, "extension"), lambda e: as_string(F.variant_get(e, "$.url", "variant")) == url
            )
        if name == "iif":
            if len(args) not in (2, 3):
                raise FhirPathError("iif() takes 2 or 3 arguments")
            cond = self.compile_bool(args[0], focus, at_root)
            other = self.compile(args[2], focus, at_root) if len(args) == 3 else empty()
            return F.when(F.coalesce(cond, F.lit(False)), self.compile(args[1], focus, at_root)).otherwise(
                other
            )
        if name in ("toString", "lower", "upper", "trim", "length"):
            s = as_string(first(base))
            fn = {
                "toString": lambda c: c,
                "lower": F.lower,
                "upper": F.upper,
                "trim": F.trim,
                "length": F.length,
            }
            return from_scalar(fn[name](s))
        if name in ("startsWith", "endsWith", "contains"):
            self._arity(node, 1)
            s = as_string(first(base))
            arg = as_string(first(self.compile(args[0], focus, at_root)))
            fn = {"startsWith": F.startswith, "endsWith": F.endswith, "contains": F.contains}[name]
            return from_bool(fn(s, arg))
        if name in ("lowBoundary", "highBoundary"):
            target = node.target
            hint = target.args[0].value if isinstance(target, fp.Call) and target.name == "ofType" else None
            return self._boundary(base, name == "lowBoundary", hint)
        if name in ("toInteger", "toDecimal"):
            target = "bigint" if name == "toInteger" else "double"
            return from_scalar(F.try_variant_get(first(base), "$", target))
        raise FhirPathError(f"FHIRPath function {name}() is not supported")

    @staticmethod
    def _arity(node: fp.Call, n: int) -> None:
        if len(node.args) != n:
            raise FhirPathError(f"{node.name}() takes {n} argument(s), got {len(node.args)}")

    def _of_type(self, node: fp.Call, focus, at_root) -> Expr:
        self._arity(node, 1)
        type_arg = node.args[0]
        type_name = type_arg.value if isinstance(type_arg, fp.Literal) else None
        if not type_name or type_arg.kind != "type":
            raise FhirPathError("ofType() takes a type name")
        target = node.target
        if isinstance(target, fp.Member):
            # a choice element: value.ofType(Quantity) reads valueQuantity
            choice = fp.Member(target.target, target.name + type_name[0].upper() + type_name[1:])
            return self.compile(choice, focus, at_root)
        base = focus if target is None else self.compile(target, focus, at_root)
        return self._type_op(base, type_name, "as")

    @staticmethod
    def _reference_key(references: Expr, args: tuple) -> Expr:
        """The id a Reference points to (``Patient/1``, ``http://x/Patient/1/_history/2`` and
        ``urn:uuid:1`` give ``1``; a conditional reference is kept whole). With a type, references
        known to point elsewhere give nothing (a ``urn:uuid:`` reference carries no type: kept)."""
        wanted = None
        if args:
            if not (isinstance(args[0], fp.Literal) and args[0].kind == "type"):
                raise FhirPathError("getReferenceKey() takes a resource type name")
            wanted = args[0].value

        def key(ref: Expr) -> Expr:
            # the regular expression only where a slash can match it (not a urn:uuid: reference)
            slash = ref.contains("/")
            typed = F.when(slash, F.regexp_extract(ref, _TYPED_REFERENCE, 2)).otherwise(F.lit(""))
            kind = F.when(slash, F.regexp_extract(ref, _TYPED_REFERENCE, 1)).otherwise(F.lit(""))
            k = (
                F.when(ref.contains("?"), ref)
                .when(typed != "", typed)
                .when(ref.startswith("urn:"), F.substring_index(ref, ":", -1))
            )
            if wanted is not None:
                k = F.when((kind == wanted) | ((kind == "") & ~ref.contains("/")), k)
            return k

        refs = F.transform(references, lambda r: key(as_string(r)).cast("variant"))
        return F.filter(refs, lambda x: x.isNotNull() & ~F.is_variant_null(x))

    @staticmethod
    def _boundary(base: Expr, low: bool, type_hint: str | None) -> Expr:
        return let(lambda b: Compiler._bounds(b, low, type_hint), base)

    @staticmethod
    def _bounds(base: Expr, low: bool, type_hint: str | None) -> Expr:
        """lowBoundary()/highBoundary() of decimals (by their precision), dates and times. A partial
        date stays a date unless the path says it is a dateTime (``ofType(dateTime)``)."""
        v = first(base)
        s = as_string(v)
        decimals = F.when(F.instr(s, ".") > 0, F.length(s) - F.instr(s, ".")).otherwise(F.lit(0))
        half = F.pow(F.lit(10.0), -(decimals + 1)) * 5
        number = F.try_variant_get(v, "$", "double")
        num = number - half if low else number + half
        # dates and times: fill the missing parts with the lowest / highest value
        y = F.regexp_extract(s, r"^(\d{4})(-\d{2})?(-\d{2})?(T.*)?$", 1)
        ym = F.regexp_extract(s, r"^(\d{4}-\d{2})(-\d{2})?(T.*)?$", 1)
        ymd = F.regexp_extract(s, r"^(\d{4}-\d{2}-\d{2})$", 1)
        month_end = F.date_format(F.last_day(F.to_date(F.concat(ym, F.lit("-01")))), "dd")
        day = (
            F.when(ymd != "", ymd)
            .when(ym != "", F.concat(ym, F.lit("-01") if low else F.concat(F.lit("-"), month_end)))
            .when(y != "", F.concat(y, F.lit("-01-01" if low else "-12-31")))
        )
        date_text = day
        if type_hint in ("dateTime", "instant"):
            date_text = F.concat(day, F.lit("T00:00:00.000+14:00" if low else "T23:59:59.999-12:00"))
        is_date_only = s.rlike(r"^\d{4}(-\d{2}(-\d{2})?)?$")
        datetime_part = F.regexp_extract(
            s, r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?)(\.\d+)?(Z|[+-]\d{2}:\d{2})?$", 1
        )
        tz = F.regexp_extract(s, r"(Z|[+-]\d{2}:\d{2})$", 1)
        secs = F.when(F.length(datetime_part) == 16, F.lit(":00" if low else ":59")).otherwise(F.lit(""))
        millis = F.regexp_extract(s, r"\.(\d+)", 1)
        frac = F.when(millis != "", F.concat(F.lit("."), F.rpad(millis, 3, "0" if low else "9"))).otherwise(
            F.lit(".000" if low else ".999")
        )
        dt_text = F.when(
            datetime_part != "",
            F.concat(
                datetime_part,
                secs,
                frac,
                F.when(tz != "", tz).otherwise(F.lit("+14:00" if low else "-12:00")),
            ),
        )
        time_part = F.regexp_extract(s, r"^(\d{2}:\d{2}(:\d{2})?)(\.\d+)?$", 1)
        time_secs = F.when(F.length(time_part) == 5, F.lit(":00" if low else ":59")).otherwise(F.lit(""))
        time_text = F.when(time_part != "", F.concat(time_part, time_secs, frac))
        return (
            F.when(v.isNull(), empty())
            .when(_is_number(v), from_scalar(num))
            .when(is_date_only, from_scalar(date_text))
            .when(dt_text.isNotNull(), from_scalar(dt_text))
            .when(time_text.isNotNull(), from_scalar(time_text))
            .otherwise(empty())
        )


def compile_path(text_or_node, focus: Expr, scope: Scope, at_root: bool = False) -> Expr:
    """The collection ``text_or_node`` evaluates to on ``focus`` (an ``array<variant>`` column)."""
    node = fp.parse(text_or_node) if isinstance(text_or_node, str) else text_or_node
    return Compiler(scope).compile(node, focus, at_root)
