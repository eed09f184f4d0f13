"""The FHIRPath subset of SQL on FHIR v2, parsed into a small syntax tree.

Only syntax lives here; what the nodes mean on Spark is in :mod:`ehrlake.views.compiler`. The
grammar follows FHIRPath's precedence table (invocation, unary, multiplicative, additive, type,
union, inequality, equality, membership, and, or/xor, implies); a text that does not parse raises
:class:`FhirPathError` with the position, so a view with a wrong path is rejected before it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ehrlake.errors import EhrlakeError


class FhirPathError(EhrlakeError):
    """A FHIRPath expression that does not parse, or uses what the compiler does not support."""


@dataclass(frozen=True)
class Literal:
    value: object  # str | int | float | bool | None (None: the empty collection ``{}``)
    kind: str  # string | integer | decimal | boolean | date | dateTime | time | empty


@dataclass(frozen=True)
class Constant:
    name: str  # %name, without the percent sign


@dataclass(frozen=True)
class This:
    pass


@dataclass(frozen=True)
class Member:
    target: object | None  # None: navigate from the focus
    name: str


@dataclass(frozen=True)
class Call:
    target: object | None  # None: a function of the focus
    name: str
    args: tuple


@dataclass(frozen=True)
class Index:
    target: object
    index: object


@dataclass(frozen=True)
class Binary:
    op: str
    left: object
    right: object


@dataclass(frozen=True)
class Unary:
    op: str
    operand: object


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^'\\]|\\.)*')
    | (?P<datetime>@T?[0-9][0-9:\-T.+Z]*)
    | (?P<number>\d+(?:\.\d+)?)
    | (?P<delimited>`[^`]*`)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<special>\$this|\$index|\$total|%[A-Za-z_][A-Za-z0-9_]*|%`[^`]*`)
    | (?P<op><=|>=|!=|!~|[-+*/&|<>=~.,()\[\]{}])
    )""",
    re.VERBOSE,
)

_ESCAPES = {"'": "'", '"': '"', "`": "`", "\\": "\\", "/": "/", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "u" and i + 5 < len(text):
                out.append(chr(int(text[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    pos, out = 0, []
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise FhirPathError(f"cannot read FHIRPath {text!r} at position {pos}")
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


_KEYWORD_OPS = {"and", "or", "xor", "implies", "is", "as", "div", "mod", "in", "contains"}
# precedence levels, lowest first; each a set of binary operators
_LEVELS = [
    {"implies"},
    {"or", "xor"},
    {"and"},
    {"in", "contains"},
    {"=", "~", "!=", "!~"},
    {"<", ">", "<=", ">="},
    {"|"},
    {"is", "as"},
    {"+", "-", "&"},
    {"*", "/", "div", "mod"},
]


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i]

    def take(self) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        kind, val, pos = self.take()
        if val != value:
            raise FhirPathError(f"FHIRPath {self.text!r}: expected {value!r} at position {pos}, got {val!r}")

    def _op_at(self, level: int) -> str | None:
        kind, val, _ = self.peek()
        if kind == "op" and val in _LEVELS[level]:
            return val
        if kind == "ident" and val in _KEYWORD_OPS and val in _LEVELS[level]:
            return val
        return None

    def parse(self):
        node = self.binary(0)
        kind, val, pos = self.peek()
        if kind != "end":
            raise FhirPathError(f"FHIRPath {self.text!r}: unexpected {val!r} at position {pos}")
        return node

    def binary(self, level: int):
        if level == len(_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while (op := self._op_at(level)) is not None:
            self.take()
            right = Literal(self.type_name(), "type") if op in ("is", "as") else self.binary(level + 1)
            left = Binary(op, left, right)
        return left

    def type_name(self) -> str:
        kind, val, pos = self.take()
        if kind not in ("ident", "delimited"):
            raise FhirPathError(f"FHIRPath {self.text!r}: a type name expected at position {pos}")
        name = val.strip("`")
        while self.peek()[1] == "." and self.toks[self.i + 1][0] == "ident":
            self.take()
            name = self.take()[1]  # System.String -> String; FHIR.Quantity -> Quantity
        return name

    def unary(self):
        kind, val, _ = self.peek()
        if kind == "op" and val in ("+", "-"):
            self.take()
            return Unary(val, self.unary())
        return self.invocation()

    def invocation(self):
        node = self.term()
        while True:
            kind, val, pos = self.peek()
            if val == ".":
                self.take()
                node = self.member_or_call(node)
            elif val == "[":
                self.take()
                index = self.binary(0)
                self.expect("]")
                node = Index(node, index)
            else:
                return node

    def member_or_call(self, target):
        kind, val, pos = self.take()
        if kind not in ("ident", "delimited"):
            raise FhirPathError(f"FHIRPath {self.text!r}: a name expected at position {pos}, got {val!r}")
        name = val.strip("`")
        if kind == "ident" and self.peek()[1] == "(":
            return Call(target, name, self.arguments(name))
        return Member(target, name)

    def arguments(self, name: str) -> tuple:
        self.expect("(")
        args = []
        if self.peek()[1] != ")":
            if name in ("ofType", "getReferenceKey") and self.peek()[0] in ("ident", "delimited"):
                args.append(Literal(self.type_name(), "type"))
            else:
                args.append(self.binary(0))
            while self.peek()[1] == ",":
                self.take()
                args.append(self.binary(0))
        self.expect(")")
        return tuple(args)

    def term(self):
        kind, val, pos = self.take()
        if kind == "string":
            return Literal(_unescape(val[1:-1]), "string")
        if kind == "number":
            return Literal(float(val), "decimal") if "." in val else Literal(int(val), "integer")
        if kind == "datetime":
            body = val[1:]
            if body.startswith("T"):
                return Literal(body[1:], "time")
            return Literal(body, "dateTime" if "T" in body else "date")
        if kind == "special":
            if val == "$this":
                return This()
            if val.startswith("%"):
                return Constant(val[1:].strip("`"))
            raise FhirPathError(f"FHIRPath {self.text!r}: {val} is not supported")
        if kind == "delimited":
            return Member(None, val.strip("`"))
        if kind == "ident":
            if val in ("true", "false"):
                return Literal(val == "true", "boolean")
            if self.peek()[1] == "(":
                return Call(None, val, self.arguments(val))
            return Member(None, val)
        if val == "(":
            node = self.binary(0)
            self.expect(")")
            return node
        if val == "{":
            self.expect("}")
            return Literal(None, "empty")
        raise FhirPathError(f"FHIRPath {self.text!r}: unexpected {val!r} at position {pos}")


def parse(text: str):
    """The syntax tree of one FHIRPath expression (raises :class:`FhirPathError`)."""
    if not isinstance(text, str) or not text.strip():
        raise FhirPathError(f"a FHIRPath expression must be a non-empty string, not {text!r}")
    return _Parser(text).parse()
