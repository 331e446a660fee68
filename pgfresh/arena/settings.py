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

from pgfresh.configtypes import NUMBER, Spec, check_section, choice, integer, number
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
    hot_rows: float = 1.0  # shop: share of products in the hot set (1: every product alike)
    hot_changes: float = 0.9  # shop: share of price and stock updates that go to the hot set
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


def _listed(value) -> list:
    """A list of strings as the config may write it: one string is a list of one."""
    return [value] if isinstance(value, str) else value


_STRINGS = ((str, list), lambda v: all(isinstance(x, str) and x for x in _listed(v)), "a list of strings")
_SPEC: Spec = {  # the keys of ArenaSettings
    "workload": choice(*WORKLOADS),
    "minutes": number(0.0, above=True), "noise": number(0.0, 0.5), "seed": integer(0),
    "rate_per_s": number(0.0, above=True), "correct_after_s": number(0.0),
    "hot_rows": number(0.0, 1.0, above=True), "hot_changes": number(0.0, 1.0), "batch_interval_s": number(0.0, above=True),
    "questions_per_batch": integer(1), "min_questions": integer(0), "batches": integer(0),
    "strategies": _STRINGS, "oltp_seconds": number(0.0), "oltp_clients": integer(1), "wal_seconds": number(0.0),
    "export_seconds": number(0.0), "noisy_window_s": number(0.0),
    "scale": (dict, None, "a table ([arena.scale])"),
    "questions": (list, None, "a list of [[arena.questions]] entries"),
    "setup_sql": (str, bool, "a string"),
    "change": (str, lambda v: ":" in v, '"module:function"'),
    "change_sql": _STRINGS, "noise_sql": _STRINGS,
}
_SCALE: Spec = {key: integer(1) for key in ("shops", "products_per_shop", "notes_per_shop")}
_TABLE_OF_LISTS = 'a table of lists, e.g. { price = ["..."] }'
_QUESTION: Spec = {  # an entry of [[arena.questions]]
    "table": (str, bool, "a table name from [[tables]]"),
    "visible_when": (str, lambda v: bool(v.strip()), "an SQL condition like \"status = 'published'\""),
    "held_out": (dict, None, _TABLE_OF_LISTS),
    "invent": (dict, None, _TABLE_OF_LISTS),
}


def _parse_question(i: int, raw: Any, tables: set[str], problems: list[str]) -> QuestionSpec | None:
    path = f"arena.questions[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a table ([[arena.questions]]), got {raw!r}")
        return None
    good = check_section(raw, path, _QUESTION, problems)
    lists = {}
    for key in ("held_out", "invent"):  # name -> a list of strings, for any name
        value = good.get(key, {})
        lists[key] = {name: _listed(items) for name, items in
                      check_section(value, f"{path}.{key}", dict.fromkeys(value, _STRINGS), problems).items()}
    if "table" not in raw:
        problems.append(f"{path}.table: expected a table name from [[tables]]")
    if "table" not in good:
        return None
    table = good["table"] if "." in good["table"] else f"public.{good['table']}"
    if table not in tables:
        problems.append(f"{path}.table: {table} is not one of [[tables]] ({', '.join(sorted(tables)) or 'none'})")
    return QuestionSpec(table=table, visible_when=good.get("visible_when"), **lists)


def parse(raw: dict, tables: set[str]) -> tuple[ArenaSettings, list[str]]:
    """ArenaSettings from the raw [arena] table, and the list of problems (empty when valid)."""
    problems: list[str] = []
    s = ArenaSettings()
    for key, value in check_section(raw, "arena", _SPEC, problems).items():
        if key == "scale":
            s.scale = {**s.scale, **check_section(value, "arena.scale", _SCALE, problems)}
        elif key == "questions":
            s.questions = [q for i, raw_q in enumerate(value) if (q := _parse_question(i, raw_q, tables, problems))]
        elif _SPEC[key] is _STRINGS:
            setattr(s, key, _listed(value))
        else:
            setattr(s, key, float(value) if _SPEC[key][0] is NUMBER else value)
    if s.workload == "custom" and not (s.change or s.change_sql):
        problems.append("arena.change: a custom workload needs change = \"module:function\" or change_sql = [...]")
    return s, problems


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
    for i, raw in enumerate(table.facts or []):
        question = raw.get("question")
        phrasings = list(question) if isinstance(question, list) else [question]
        phrasings += list(raw.get("paraphrases", []))
        name = str(raw.get("name", default_template_name(i)))
        out.append(FactTemplate(name=name, table=spec.table, phrasings=[p for p in phrasings if p],
                                answer=raw.get("answer", ""), gone=raw.get("gone"),
                                held_out=spec.held_out.get(name, [])))
    return [t for t in out if t.phrasings and t.answer]
