"""The `[arena]` section of pgfresh.toml: typed, validated once, every problem reported at once.

    [arena]
    workload = "shop"            # "shop-zh" (in Chinese), or "custom" (then setup_sql / change / change_sql below)
    minutes = 3                  # length of the live phase
    noise = 0.1                  # share of changes that are noise, 0 to 0.5
    seed = 7
    rate_per_s = 5               # changes per second the workload commits
    strategies = ["stale", "rag-dense"]

    [[arena.questions]]          # which facts the arena asks about
    table = "shop.products"
    visible_when = "status = 'published'"     # SQL over the source table
    held_out = { price = ["Tell me what {name} goes for these days."] }
    invent = { name = ["Quantum Toaster"] }   # values for questions about rows that never existed

`check_config(config)` is called by `pgfresh.config.parse` (registered in `pgfresh.stages`); `settings(config)`
returns the parsed `ArenaSettings` for the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pgfresh.render import default_template_name

WORKLOADS = ("shop", "shop-zh", "custom")


@dataclass
class FactTemplate:
    """One [[tables.facts]] entry, normalised: the canonical question first, then paraphrases."""

    name: str
    table: str
    phrasings: list[str]  # [canonical question, paraphrases...]: what training may see
    answer: str
    gone: str | None = None
    held_out: list[str] = field(default_factory=list)  # asked only by the arena


@dataclass
class QuestionSpec:
    table: str  # schema.table, one of [[tables]]
    visible_when: str | None = None  # SQL predicate: rows that are facts (None: every row)
    held_out: dict[str, list[str]] = field(default_factory=dict)  # template name -> phrasings
    invent: dict[str, list[str]] = field(default_factory=dict)  # column -> values for never-existed rows


@dataclass
class ArenaSettings:
    workload: str = "shop"
    minutes: float = 3.0  # live phase, minutes
    noise: float = 0.1  # share of changes that are noise (0 to 0.5)
    seed: int = 7
    rate_per_s: float = 5.0  # workload changes per second
    correct_after_s: float = 20.0  # a plausible-but-wrong value is corrected after this many seconds
    batch_interval_s: float = 10.0  # seconds between question batches
    questions_per_batch: int = 12
    min_questions: int = 0  # >0: batches grow so that each strategy answers at least this many questions
    batches: int = 0  # >0: run exactly this many batches, batch_interval_s apart, instead of `minutes`
    strategies: list[str] = field(default_factory=list)  # empty: every registered strategy
    oltp_seconds: float = 5.0  # each pgbench window (with / without pgfresh); 0: not measured
    oltp_clients: int = 2
    wal_seconds: float = 5.0  # each WAL window of the live workload (without / with pgfresh); 0: not measured
    export_seconds: float = 10.0  # each export in the long-transaction comparison; 0: not measured
    noisy_window_s: float = 60.0  # a corrected row stays in the noisy class this long
    scale: dict = field(default_factory=lambda: {"shops": 4, "products_per_shop": 30, "notes_per_shop": 10})
    questions: list[QuestionSpec] = field(default_factory=list)
    setup_sql: str | None = None  # custom: file run once to create and seed the tables
    change: str | None = None  # custom: "module:function" making one change
    change_sql: list[str] = field(default_factory=list)  # custom: statements, one per change
    noise_sql: list[str] = field(default_factory=list)  # custom: statements recorded as noise


_NUMBERS = {
    "minutes": (0.0, None, False), "noise": (0.0, 0.5, True), "rate_per_s": (0.0, None, False),
    "correct_after_s": (0.0, None, True), "batch_interval_s": (0.0, None, False),
    "oltp_seconds": (0.0, None, True), "export_seconds": (0.0, None, True), "wal_seconds": (0.0, None, True),
    "noisy_window_s": (0.0, None, True),
}
_INTS = {"seed": 0, "questions_per_batch": 1, "oltp_clients": 1, "batches": 0, "min_questions": 0}
_SCALE = ("shops", "products_per_shop", "notes_per_shop")


def _number(problems, path, value, lo, hi, lo_inclusive) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{path}: expected a number, got {value!r}")
        return None
    if (value < lo or (value == lo and not lo_inclusive)) or (hi is not None and value > hi):
        bound = f"{'>=' if lo_inclusive else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
        problems.append(f"{path}: expected a number {bound}, got {value!r}")
        return None
    return float(value)


def _str_list(problems, path, value) -> list[str] | None:
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        problems.append(f"{path}: expected a list of strings, got {value!r}")
        return None
    return value


def _parse_question(i: int, raw: Any, tables: set[str], problems: list[str]) -> QuestionSpec | None:
    path = f"arena.questions[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a table ([[arena.questions]])")
        return None
    for key in raw:
        if key not in ("table", "visible_when", "held_out", "invent"):
            problems.append(f"{path}.{key}: unknown key (known: table, visible_when, held_out, invent)")
    table = raw.get("table")
    if not isinstance(table, str) or not table:
        problems.append(f"{path}.table: expected a table name from [[tables]]")
        return None
    table = table if "." in table else f"public.{table}"
    if table not in tables:
        problems.append(f"{path}.table: {table} is not one of [[tables]] ({', '.join(sorted(tables)) or 'none'})")
    spec = QuestionSpec(table=table)
    if "visible_when" in raw:
        if isinstance(raw["visible_when"], str) and raw["visible_when"].strip():
            spec.visible_when = raw["visible_when"]
        else:
            problems.append(f"{path}.visible_when: expected an SQL condition like \"status = 'published'\"")
    for key in ("held_out", "invent"):
        value = raw.get(key, {})
        if not isinstance(value, dict):
            problems.append(f"{path}.{key}: expected a table of lists, e.g. {{ price = [\"...\"] }}")
            continue
        for name, items in value.items():
            parsed = _str_list(problems, f"{path}.{key}.{name}", items)
            if parsed is not None:
                getattr(spec, key)[name] = parsed
    return spec


def parse(raw: dict, tables: set[str]) -> tuple[ArenaSettings, list[str]]:
    """ArenaSettings from the raw [arena] table, and the list of problems (empty when valid)."""
    problems: list[str] = []
    s = ArenaSettings()
    for key, value in raw.items():
        path = f"arena.{key}"
        if key in _NUMBERS:
            got = _number(problems, path, value, *_NUMBERS[key])
            if got is not None:
                setattr(s, key, got)
        elif key in _INTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
                problems.append(f"{path}: expected an integer >= {_INTS[key]}, got {value!r}")
            else:
                setattr(s, key, value)
        elif key == "workload":
            if value not in WORKLOADS:
                problems.append(f"{path}: expected one of {', '.join(WORKLOADS)}, got {value!r}")
            else:
                s.workload = value
        elif key in ("strategies", "change_sql", "noise_sql"):
            got = _str_list(problems, path, value)
            if got is not None:
                setattr(s, key, got)
        elif key in ("setup_sql", "change"):
            if not isinstance(value, str) or not value:
                problems.append(f"{path}: expected a string, got {value!r}")
            elif key == "change" and ":" not in value:
                problems.append(f"{path}: expected \"module:function\", got {value!r}")
            else:
                setattr(s, key, value)
        elif key == "scale":
            _parse_scale(s, value, problems)
        elif key == "questions":
            if not isinstance(value, list):
                problems.append("arena.questions: expected a list of [[arena.questions]] entries")
                continue
            s.questions = [q for i, raw_q in enumerate(value) if (q := _parse_question(i, raw_q, tables, problems))]
        else:
            problems.append(f"{path}: unknown key")
    if s.workload == "custom" and not (s.change or s.change_sql):
        problems.append("arena.change: a custom workload needs change = \"module:function\" or change_sql = [...]")
    return s, problems


def _parse_scale(s: ArenaSettings, value: Any, problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append("arena.scale: expected a table ([arena.scale])")
        return
    for k, v in value.items():
        if k not in _SCALE:
            problems.append(f"arena.scale.{k}: unknown key (known: {', '.join(_SCALE)})")
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"arena.scale.{k}: expected an integer >= 1, got {v!r}")
        else:
            s.scale = {**s.scale, k: v}


def check_config(config) -> list[str]:
    """Problems in [arena] (and in the fact templates it asks about), each with its key path."""
    _, problems = parse(config.arena, {t.name for t in config.tables})
    return problems


def settings(config) -> ArenaSettings:
    """The parsed [arena] section (call after config.load, which has validated it)."""
    s, _ = parse(config.arena, {t.name for t in config.tables})
    return s


def fact_templates(config, spec: QuestionSpec) -> list[FactTemplate]:
    """The [[tables.facts]] of spec.table as FactTemplates, with the arena's held-out phrasings."""
    table = config.table(spec.table)
    out = []
    for i, raw in enumerate(table.facts):
        question = raw.get("question")
        phrasings = list(question) if isinstance(question, list) else [question]
        phrasings += list(raw.get("paraphrases", []))
        name = str(raw.get("name", default_template_name(i)))
        out.append(FactTemplate(name=name, table=spec.table, phrasings=[p for p in phrasings if p],
                                answer=raw.get("answer", ""), gone=raw.get("gone"),
                                held_out=spec.held_out.get(name, [])))
    return [t for t in out if t.phrasings and t.answer]
