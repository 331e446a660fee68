"""The gate policy of one table for one path, read from `[tables.gate]` and its `rag` / `train` parts.

    [tables.gate]                        # applies to both paths
    final_when = "status in ('published', 'paid')"
    required = ["name", "price"]
    types = { price = "number", stock = "int" }
    ranges = { price = [0, 100000] }     # or { price = { min = 0 } }
    patterns = { sku = "^[A-Z]{3}-[0-9]+$" }
    allowed = { status = ["draft", "published", "archived"] }
    max_length = { description = 4000 }  # or one number for every text column
    rules = { sane_discount = "discount is null or discount < price" }
    junk = { threshold = 0.5, columns = ["name", "description"], script = "LATIN" }   # or false
    pii = { drop = ["email"], mask = ["phone"], detect = true }
    [tables.gate.train]                  # replaces keys above, for training only
    settle_seconds = 30

Without any config: junk detection on (threshold 0.5), PII masking of free text on, dedup on,
RAG settle window 0 s, training settle window 5 s.

Every validator is a `Check`: a `name` (what quarantine records), the `columns` it reads, and
`reject(row) -> reason | None`. Built-ins register in `BUILDERS` under their config key; a rule
from `rules` is a check named after the rule. `parse_policy` reports every problem with its key
path into a list, so that `check_config` can report a whole file at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Callable, Protocol

from pgfresh.gate import junk
from pgfresh.gate.expr import Expr, ExprError, _comparable, _number
from pgfresh.gate.pii import Pii

PATHS = ("rag", "train")
DEFAULT_SETTLE_SECONDS = {"rag": 0.0, "train": 5.0}
DEFAULT_JUNK_THRESHOLD = 0.5


class Check(Protocol):
    name: str
    columns: set[str]

    def reject(self, row: dict) -> str | None: ...


@dataclass
class Policy:
    path: str
    settle_seconds: float = 0.0
    final_when: Expr | None = None
    non_final: str = "wait"  # rows not final: 'wait' until final, or enter after 'settle' like any row
    settle_final: bool = False  # final rows too wait out settle_seconds (default: they enter at once)
    checks: list = field(default_factory=list)
    pii: Pii = field(default_factory=Pii)
    dedup: bool = True
    near_duplicates: bool = True  # report (never reject) near-identical texts under other keys

    def columns(self) -> dict[str, set[str]]:
        """Columns each part of the policy reads, by the part's name (checked against the table)."""
        out: dict[str, set[str]] = {}
        for c in self.checks:
            key = _CONFIG_KEY.get(c.name, f"rules.{c.name}")
            out[key] = out.get(key, set()) | set(c.columns)
        if self.final_when is not None:
            out["final_when"] = self.final_when.columns()
        out["pii"] = set(self.pii.drop) | set(self.pii.mask) | set(self.pii.keep)
        return {k: v for k, v in out.items() if v}


# Where in [tables.gate] each built-in check comes from (a rule's name is its own).
_CONFIG_KEY = {"required": "required", "type": "types", "range": "ranges", "pattern": "patterns",
               "allowed": "allowed", "max_length": "max_length", "junk": "junk.columns"}


@dataclass
class _ColumnCheck:
    """A check of one column's non-null value; `test` returns a reason or None."""

    name: str
    column: str
    test: Callable[[Any], str | None]

    @property
    def columns(self) -> set[str]:
        return {self.column}

    def reject(self, row: dict) -> str | None:
        value = row.get(self.column)
        if value is None and self.name != "required":
            return None
        why = self.test(value)
        return None if why is None else f"{self.column} {why}"


@dataclass
class RuleCheck:
    name: str
    expr: Expr

    @property
    def columns(self) -> set[str]:
        return self.expr.columns()

    def reject(self, row: dict) -> str | None:
        # CHECK-constraint semantics: only a definite False rejects; unknown (null) passes.
        try:
            result = self.expr(row)
        except ExprError as exc:
            return f"cannot evaluate {self.expr.text!r}: {exc}"
        if result is None or result is True:
            return None
        if result is False:
            return f"rule {self.name!r} is false: {self.expr.text}"
        return f"rule {self.name!r} gives {result!r}, not true/false"


@dataclass
class JunkCheck:
    threshold: float = DEFAULT_JUNK_THRESHOLD
    scored: list[str] | None = None  # None: every text column except key and tenant
    script: str | None = None
    skip: set[str] = field(default_factory=set)
    name: str = "junk"

    @property
    def columns(self) -> set[str]:
        return set(self.scored or [])

    def reject(self, row: dict) -> str | None:
        score, col, why = junk.score_row(row, self.scored, self.skip, self.script)
        return None if score < self.threshold else f"{col} looks like junk (score {score:.2f}: {why})"


# --- builders: config value -> checks; each reports problems under its key path ---------------

TYPES: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()) is not None),
    "number": lambda v: _number(v) is not None,
    "text": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "date": lambda v: isinstance(v, str) and _parses(date.fromisoformat, v),
    "timestamp": lambda v: isinstance(v, str) and _parses(datetime.fromisoformat, v),
    "json": lambda v: isinstance(v, (dict, list)),
}
_TYPE_ALIASES = {"integer": "int", "bigint": "int", "float": "number", "numeric": "number", "decimal": "number",
                 "string": "text", "boolean": "bool", "datetime": "timestamp", "timestamptz": "timestamp"}


def _parses(fn, v: str) -> bool:
    try:
        fn(v.strip())
    except ValueError:
        return False
    return True


def _columns_map(value, path: str, problems: list[str], what: str) -> dict:
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a table of column = {what}, got {value!r}")
        return {}
    return value


def _required(value, path, problems):
    if not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
        problems.append(f"{path}: expected a list of column names, got {value!r}")
        return []
    missing = lambda v: "is missing" if v is None or (isinstance(v, str) and not v.strip()) else None  # noqa: E731
    return [_ColumnCheck("required", c, missing) for c in value]


def _types(value, path, problems):
    out = []
    for col, kind in _columns_map(value, path, problems, "type name").items():
        kind = _TYPE_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
        if kind not in TYPES:
            problems.append(f"{path}.{col}: expected one of {', '.join(TYPES)}, got {value[col]!r}")
            continue
        out.append(_ColumnCheck("type", col, lambda v, k=kind: None if TYPES[k](v) else f"is not {k}: {v!r:.40}"))
    return out


def _ranges(value, path, problems):
    out = []
    for col, bounds in _columns_map(value, path, problems, "[min, max]").items():
        if isinstance(bounds, dict) and set(bounds) <= {"min", "max"}:
            low, high = bounds.get("min"), bounds.get("max")
        elif isinstance(bounds, list) and len(bounds) == 2:
            low, high = bounds
        else:
            problems.append(f"{path}.{col}: expected [min, max] or {{ min = .., max = .. }}, got {bounds!r}")
            continue
        if any(b is not None and _number(b) is None for b in (low, high)):
            problems.append(f"{path}.{col}: expected numbers, got {bounds!r}")
            continue

        def test(v, low=_number(low) if low is not None else None, high=_number(high) if high is not None else None):
            n = _number(v)
            if n is None:
                return f"is not a number: {v!r:.40}"
            if (low is not None and n < low) or (high is not None and n > high):
                return f"= {v} is outside [{'' if low is None else low}, {'' if high is None else high}]"
            return None

        out.append(_ColumnCheck("range", col, test))
    return out


def _patterns(value, path, problems):
    out = []
    for col, pattern in _columns_map(value, path, problems, "regular expression").items():
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as exc:
            problems.append(f"{path}.{col}: regular expression {pattern!r} does not compile: {exc}")
            continue
        out.append(_ColumnCheck("pattern", col,
                                lambda v, r=regex: None if r.search(str(v)) else f"does not match {r.pattern!r}"))
    return out


def _allowed(value, path, problems):
    out = []
    for col, values in _columns_map(value, path, problems, "list of values").items():
        if not isinstance(values, list) or not values:
            problems.append(f"{path}.{col}: expected a non-empty list of values, got {values!r}")
            continue

        def test(v, values=values):
            for allowed in values:
                try:
                    a, b = _comparable(v, allowed)
                except ExprError:
                    continue
                if a == b:
                    return None
            return f"= {v!r:.40} is not one of {values!r:.80}"

        out.append(_ColumnCheck("allowed", col, test))
    return out


def _max_length(value, path, problems):
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return [_AllTextLength(value)]
    out = []
    for col, n in _columns_map(value, path, problems, "maximum length").items():
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
            problems.append(f"{path}.{col}: expected a positive number of characters, got {n!r}")
            continue
        out.append(_ColumnCheck("max_length", col, lambda v, n=n: None if len(str(v)) <= n
                                else f"is {len(str(v))} characters, more than {n}"))
    return out


@dataclass
class _AllTextLength:
    limit: int
    name: str = "max_length"
    columns: set = field(default_factory=set)

    def reject(self, row: dict) -> str | None:
        for col, v in row.items():
            if isinstance(v, str) and len(v) > self.limit:
                return f"{col} is {len(v)} characters, more than {self.limit}"
        return None


def _rules(value, path, problems):
    out = []
    for name, text in _columns_map(value, path, problems, "expression").items():
        if name in BUILDERS or name in ("render", "dedup", "settle", "near_duplicate"):
            problems.append(f"{path}.{name}: a rule may not take the name of a built-in check")
            continue
        if not isinstance(text, str):
            problems.append(f"{path}.{name}: expected an expression string, got {text!r}")
            continue
        try:
            out.append(RuleCheck(name, Expr(text)))
        except ExprError as exc:
            problems.append(f"{path}.{name}: expression {text!r} does not parse: {exc}")
    return out


def _junk(value, path, problems):
    if value is False:
        return []
    if value is True:
        return [JunkCheck()]
    spec = _columns_map(value, path, problems, "setting")
    check = JunkCheck()
    for key, v in spec.items():
        if key == "enabled" and isinstance(v, bool):
            if not v:
                return []
        elif key == "threshold" and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1:
            check.threshold = float(v)
        elif key == "columns" and isinstance(v, list) and all(isinstance(c, str) for c in v):
            check.scored = v
        elif key == "script" and isinstance(v, str) and v.strip():
            check.script = v.strip().upper()
        else:
            problems.append(f"{path}.{key}: unknown key or bad value {v!r} (known: enabled = bool, "
                            "threshold = number in (0, 1], columns = [names], script = 'LATIN' | 'CYRILLIC' | ...)")
    return [check]


# Order matters only for which reason a row gets when several checks would reject it.
BUILDERS: dict[str, Callable[[Any, str, list[str]], list]] = {
    "required": _required, "types": _types, "ranges": _ranges, "patterns": _patterns,
    "allowed": _allowed, "max_length": _max_length, "rules": _rules, "junk": _junk,
}
_SETTINGS = {"settle_seconds", "final_when", "non_final", "settle_final", "pii", "dedup", "near_duplicates"}


def _pii(value, path, problems) -> Pii:
    spec = _columns_map(value, path, problems, "setting")
    pii = Pii()
    for key, v in spec.items():
        if key in ("drop", "mask", "keep") and isinstance(v, list) and all(isinstance(c, str) for c in v):
            setattr(pii, key, list(v))
        elif key == "detect" and isinstance(v, bool):
            pii.detect = v
        else:
            problems.append(f"{path}.{key}: unknown key or bad value {v!r} (known: drop = [columns], "
                            "mask = [columns], keep = [columns], detect = bool)")
    return pii


def _setting(policy: Policy, key: str, value, path: str, problems: list[str]) -> None:
    if key == "settle_seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(f"{path}: expected a number of seconds >= 0, got {value!r}")
        else:
            policy.settle_seconds = float(value)
    elif key == "final_when":
        try:
            policy.final_when = Expr(value) if isinstance(value, str) else None
            if policy.final_when is None:
                problems.append(f"{path}: expected an expression string, got {value!r}")
        except ExprError as exc:
            problems.append(f"{path}: expression {value!r} does not parse: {exc}")
    elif key == "non_final":
        if value not in ("wait", "settle"):
            problems.append(f"{path}: expected 'wait' (until final) or 'settle', got {value!r}")
        else:
            policy.non_final = value
    elif key == "pii":
        policy.pii = _pii(value, path, problems)
    elif isinstance(value, bool):
        setattr(policy, key, value)
    else:
        problems.append(f"{path}: expected true or false, got {value!r}")


def parse_policy(gate: dict, path: str, where: str, problems: list[str], skip: set[str] = frozenset()) -> Policy:
    """The policy for `path` ('rag' or 'train') from a table's gate section at key path `where`.

    `skip`: the table's key and tenant columns, which junk and PII detection leave alone.
    """
    merged = {k: (v, f"{where}.{k}") for k, v in gate.items() if k not in PATHS}
    section = gate.get(path, {})
    if not isinstance(section, dict):
        problems.append(f"{where}.{path}: expected a table ([tables.gate.{path}])")
        section = {}
    merged.update({k: (v, f"{where}.{path}.{k}") for k, v in section.items()})
    policy = Policy(path=path, settle_seconds=DEFAULT_SETTLE_SECONDS[path])
    merged.setdefault("junk", (True, f"{where}.junk"))
    known = ", ".join(sorted([*BUILDERS, *_SETTINGS, *PATHS]))
    for key, (value, keypath) in merged.items():
        if key in _SETTINGS:
            _setting(policy, key, value, keypath, problems)
        elif key not in BUILDERS:
            problems.append(f"{keypath}: unknown key (known: {known})")
    for key, build in BUILDERS.items():  # in BUILDERS order, whatever the file's order
        if key in merged:
            policy.checks.extend(build(*merged[key], problems))
    for c in policy.checks:
        if isinstance(c, JunkCheck):
            c.skip = set(skip)
    policy.pii.keep = sorted(set(policy.pii.keep) | set(skip))
    return policy
