"""A small, safe, SQL-like expression language over one row: `final_when` and the gate's rules.

    status in ('published', 'paid')
    price > 0 and (discount is null or discount < price * 0.5)
    not (name like 'test%') and length(description) <= 2000

Grammar: `or`, `and`, `not`; comparisons `= == != <> < <= > >=`; `is [not] null`;
`[not] in (literal, ...)`; `[not] like 'pattern'` (`%` any run, `_` one character);
`[not] between a and b`; arithmetic `+ - * /`; numbers, 'strings' ('' escapes a quote), true,
false, null; column names (bare or "double-quoted"); functions `length lower upper trim abs`.

It is parsed once (`parse` raises `ExprError` with the position) into a tree of tuples and
evaluated by a small interpreter: nothing is ever handed to `eval`, and no attribute, index or
call outside the five functions exists. Values follow SQL: a comparison with null is unknown
(None), `and`/`or`/`not` use three-valued logic, and text that reads as a number compares as one
(capture keeps `numeric` as text so that no precision is lost). `evaluate` raises `ExprError` on a
type mismatch (comparing 'abc' with 3), which the gate reports as the rule's reason.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)|(?P<str>'(?:[^']|'')*')|(?P<qid>\"(?:[^\"]|\"\")+\")"
    r"|(?P<id>[A-Za-z_][A-Za-z0-9_$]*)|(?P<op><>|!=|==|<=|>=|[=<>()+\-*/,]))"
)
_KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false", "like", "between"}
FUNCTIONS = {
    "length": lambda v: Decimal(len(_text(v))),
    "lower": lambda v: _text(v).lower(),
    "upper": lambda v: _text(v).upper(),
    "trim": lambda v: _text(v).strip(),
    "abs": lambda v: abs(_number(v)),
}
_COMPARE = {"=", "==", "!=", "<>", "<", "<=", ">", ">="}


class ExprError(ValueError):
    """An expression that does not parse, or a value it cannot compare; the message says where."""


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExprError(f"unexpected {text[pos:].strip()[:10]!r} at position {pos + 1}")
        kind = m.lastgroup
        value, start = m.group(kind), m.start(kind)
        if kind == "id" and value.lower() in _KEYWORDS:
            kind, value = "kw", value.lower()
        elif kind == "qid":
            kind, value = "id", value[1:-1].replace('""', '"')
        out.append((kind, value, start))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, kind: str, value: str | None = None, ahead: int = 0) -> bool:
        k, v, _ = self.toks[min(self.i + ahead, len(self.toks) - 1)]
        return k == kind and (value is None or v == value)

    def take(self, kind: str, value: str | None = None) -> str:
        k, v, pos = self.toks[self.i]
        if k != kind or (value is not None and v != value):
            want = value or kind
            got = v or "the end"
            raise ExprError(f"expected {want} at position {pos + 1}, found {got!r}")
        self.i += 1
        return v

    def parse(self):
        node = self.or_()
        self.take("end")
        return node

    def or_(self):
        node = self.and_()
        while self.peek("kw", "or"):
            self.i += 1
            node = ("or", node, self.and_())
        return node

    def and_(self):
        node = self.not_()
        while self.peek("kw", "and"):
            self.i += 1
            node = ("and", node, self.not_())
        return node

    def not_(self):
        if self.peek("kw", "not"):
            self.i += 1
            return ("not", self.not_())
        return self.comparison()

    def comparison(self):
        left = self.sum_()
        if self.peek("op") and self.toks[self.i][1] in _COMPARE:
            op = self.take("op")
            return ("cmp", {"==": "=", "<>": "!="}.get(op, op), left, self.sum_())
        if self.peek("kw", "is"):
            self.i += 1
            negate = self.peek("kw", "not") and bool(self.take("kw"))
            self.take("kw", "null")
            node = ("isnull", left)
            return ("not", node) if negate else node
        negate = self.peek("kw", "not") and any(self.peek("kw", w, 1) for w in ("in", "like", "between"))
        if negate:
            self.i += 1
        if self.peek("kw", "in"):
            self.i += 1
            self.take("op", "(")
            items = [self.sum_()]
            while self.peek("op", ","):
                self.i += 1
                items.append(self.sum_())
            self.take("op", ")")
            node = ("in", left, items)
        elif self.peek("kw", "like"):
            self.i += 1
            node = ("like", left, self.sum_())
        elif self.peek("kw", "between"):
            self.i += 1
            low = self.sum_()
            self.take("kw", "and")
            node = ("between", left, low, self.sum_())
        else:
            return left
        return ("not", node) if negate else node

    def sum_(self):
        node = self.product()
        while self.peek("op", "+") or self.peek("op", "-"):
            node = ("arith", self.take("op"), node, self.product())
        return node

    def product(self):
        node = self.unary()
        while self.peek("op", "*") or self.peek("op", "/"):
            node = ("arith", self.take("op"), node, self.unary())
        return node

    def unary(self):
        if self.peek("op", "-"):
            self.i += 1
            return ("arith", "-", ("lit", Decimal(0)), self.unary())
        return self.atom()

    def atom(self):
        kind, value, pos = self.toks[self.i]
        if kind == "num":
            self.i += 1
            return ("lit", Decimal(value))
        if kind == "str":
            self.i += 1
            return ("lit", value[1:-1].replace("''", "'"))
        if kind == "kw" and value in ("true", "false", "null"):
            self.i += 1
            return ("lit", {"true": True, "false": False, "null": None}[value])
        if kind == "op" and value == "(":
            self.i += 1
            node = self.or_()
            self.take("op", ")")
            return node
        if kind == "id":
            self.i += 1
            if self.peek("op", "("):
                if value.lower() not in FUNCTIONS:
                    raise ExprError(f"unknown function {value!r} at position {pos + 1} (known: {', '.join(FUNCTIONS)})")
                self.take("op", "(")
                arg = self.or_()
                self.take("op", ")")
                return ("call", value.lower(), arg)
            return ("col", value)
        raise ExprError(f"expected a value at position {pos + 1}, found {value or 'the end'!r}")


class Expr:
    """A parsed expression: `Expr(text)` parses (or raises ExprError); `expr(row)` evaluates."""

    def __init__(self, text: str):
        self.text = text
        self.tree = _Parser(text).parse()

    def columns(self) -> set[str]:
        """Every column name the expression reads (checked against the table's columns)."""
        found: set[str] = set()

        def walk(node):
            if node[0] == "col":
                found.add(node[1])
            for part in node[1:]:
                if isinstance(part, tuple):
                    walk(part)
                elif isinstance(part, list):
                    for item in part:
                        walk(item)

        walk(self.tree)
        return found

    def __call__(self, row: dict):
        """True, False or None (unknown, as SQL's null); ExprError on a type mismatch."""
        return _eval(self.tree, row)

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _number(v):
    """A Decimal for numbers and numeric text; None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, Decimal):
        return v
    if isinstance(v, (int, float)):
        return Decimal(str(v))
    if isinstance(v, str):
        try:
            d = Decimal(v.strip())
        except InvalidOperation:
            return None
        return d if d.is_finite() else None
    return None


def _comparable(a, b):
    """Bring two non-null values to one type, as PostgreSQL would cast an untyped literal."""
    if isinstance(a, bool) or isinstance(b, bool):
        if isinstance(a, str):
            a = {"true": True, "t": True, "false": False, "f": False}.get(a.lower(), a)
        if isinstance(b, str):
            b = {"true": True, "t": True, "false": False, "f": False}.get(b.lower(), b)
        if type(a) is type(b):
            return a, b
    else:
        na, nb = _number(a), _number(b)
        if na is not None and nb is not None:
            return na, nb
        if isinstance(a, str) and isinstance(b, str):
            return a, b
    raise ExprError(f"cannot compare {a!r} with {b!r}")


def _like(value: str, pattern: str) -> bool:
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def _eval(node, row):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "col":
        return row.get(node[1])
    if kind == "and":
        a, b = _eval(node[1], row), _eval(node[2], row)
        return False if (a is False or b is False) else (None if (a is None or b is None) else True)
    if kind == "or":
        a, b = _eval(node[1], row), _eval(node[2], row)
        return True if (a is True or b is True) else (None if (a is None or b is None) else False)
    if kind == "not":
        a = _eval(node[1], row)
        return None if a is None else not _truth(a)
    if kind == "isnull":
        return _eval(node[1], row) is None
    if kind == "call":
        v = _eval(node[2], row)
        return None if v is None else FUNCTIONS[node[1]](v)
    if kind == "arith":
        return _arith(node[1], _eval(node[2], row), _eval(node[3], row))
    left = _eval(node[2] if kind == "cmp" else node[1], row)
    if kind == "cmp":
        return _compare(node[1], left, _eval(node[3], row))
    if kind == "in":
        results = [_compare("=", left, _eval(item, row)) for item in node[2]]
        return True if True in results else (None if None in results else False)
    if kind == "like":
        pattern = _eval(node[2], row)
        return None if left is None or pattern is None else _like(_text(left), _text(pattern))
    if kind == "between":
        low, high = _compare(">=", left, _eval(node[2], row)), _compare("<=", left, _eval(node[3], row))
        return _eval(("and", ("lit", low), ("lit", high)), row)
    raise AssertionError(node)


def _truth(v) -> bool:
    if isinstance(v, bool):
        return v
    raise ExprError(f"expected a true/false value, got {v!r}")


def _compare(op: str, a, b):
    if a is None or b is None:
        return None
    a, b = _comparable(a, b)
    if op in ("=", "!="):
        return (a == b) == (op == "=")
    try:
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    except TypeError:
        raise ExprError(f"cannot order {a!r} and {b!r}") from None


def _arith(op: str, a, b):
    if a is None or b is None:
        return None
    na, nb = _number(a), _number(b)
    if na is None or nb is None:
        raise ExprError(f"cannot compute {a!r} {op} {b!r}")
    if op == "/" and nb == 0:
        raise ExprError("division by zero")
    return {"+": na + nb, "-": na - nb, "*": na * nb, "/": na / nb}[op]


def truthy(result) -> bool:
    """WHERE semantics: only True passes (null / unknown does not)."""
    return result is True
