"""render: an accepted row becomes a Document (for RAG) and Facts (for training), deterministically.

- `render_document(table, row)`: the table's `document` template, or a readable default: the
  table's name as a heading, then `column: value` lines. Templates are `str.format` fields naming
  columns (`{name}`, `{price:.2f}`), through a formatter that refuses attribute and index access,
  so a template can read a row and nothing else.
- `render_facts(...)`: per fact template (`[[tables.facts]]`), a question/answer pair whose
  question comes in several phrasings: the template's own, plus built-in rule-based rewrites
  (`paraphrases`), at least 3 besides the canonical one; plus the row's document as a statement.
  With no fact templates, one question per column ("What is the price of Blue mug?").
- The facts worker (`pgfresh.render.worker`, consumer 'facts', registered in `pgfresh.stages`) reads the change log, passes it through
  `Gate(config, 'train')`, and writes `pgfresh.facts` with supersession: a newer version of a row
  supersedes its older facts of the same template; a delete supersedes them and, where the
  template has `gone`, adds a "no longer exists" fact. All in one short transaction with `advance`.

Same row and config, same text and same fact ids (a hash of table, key, tenant, template, kind,
question and answer): re-rendering never creates a second copy of a fact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation

from pgfresh.gate import parse_policy
from pgfresh.render import paraphrase
from pgfresh.configtypes import TableConfig, plain_table  # noqa: F401  (plain_table re-exported)
from pgfresh.errors import PgfreshError, RenderError  # noqa: F401  (RenderError re-exported)

STATEMENT = "document"  # template name of the statement fact (reserved)
_NUMERIC_SPECS = set("bcdoxXeEfFgGn%")


@dataclass(frozen=True)
class Document:
    tbl: str
    key: str
    tenant: str | None
    text: str
    lsn: int
    commit_time: datetime | None
    deleted: bool = False


@dataclass(frozen=True)
class Fact:
    fact_id: str
    tbl: str
    key: str
    tenant: str | None
    kind: str  # 'qa' | 'statement' | 'gone'
    template: str
    question: str
    paraphrases: tuple[str, ...]
    answer: str
    lsn: int
    commit_time: datetime | None


# --- templates -------------------------------------------------------------------------------

class _RowFormatter(string.Formatter):
    """str.format over one row's columns: plain names only, None as '', numbers kept numeric."""

    def get_field(self, field_name, args, kwargs):
        if field_name not in kwargs:
            raise RenderError(f"the row has no column {field_name!r}")
        return kwargs[field_name], field_name

    def convert_field(self, value, conversion):
        if conversion not in (None, "s"):
            raise RenderError(f"conversion !{conversion} is not allowed in templates")
        return value

    def format_field(self, value, spec):
        if value is None:
            return ""
        if spec and spec[-1] in _NUMERIC_SPECS and isinstance(value, str):
            # capture keeps numeric as text (no precision lost); {price:.2f} still means a number
            try:
                value = Decimal(value) if spec[-1] not in "bcdoxX" else int(value)
            except (InvalidOperation, ValueError):
                raise RenderError(f"cannot format {value!r:.40} with {{:{spec}}}: it is not a number") from None
        elif not spec:
            return value_text(value)
        try:
            return format(value, spec)
        except (ValueError, TypeError) as exc:
            raise RenderError(f"cannot format {value!r:.40} with {{:{spec}}}: {exc}") from None


_FORMATTER = _RowFormatter()


@functools.lru_cache(maxsize=4096)
def template_fields(template: str) -> tuple[str, ...]:
    """The column names a template reads; ValueError says what is wrong with its syntax."""
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or not name.isidentifier():
            raise ValueError(f"field {{{name}}} must name a column (plain name, no attributes, indexes or positions)")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"field {{{name}:{spec}}}: nested fields are not allowed")
        if conversion not in (None, "s"):
            raise ValueError(f"field {{{name}!{conversion}}}: only !s is allowed")
        fields.append(name)
    return tuple(fields)


def fill(template: str, row: dict) -> str:
    """A template filled from a row; RenderError if the row does not fit it."""
    return _FORMATTER.vformat(template, (), row)


def value_text(value) -> str:
    """How a column value reads in text: JSON for structures, true/false for booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return str(value)


def _heading(table: TableConfig) -> str:
    return table.table if table.schema == "public" else table.name


def render_document(table: TableConfig, row: dict) -> str:
    """The document text of a row (PII already removed by the gate)."""
    if table.document:
        return fill(table.document, row).strip()
    lines = [_heading(table)]
    lines += [f"{col}: {value_text(row[col])}" for col in columns_in_order(row) if row[col] is not None]
    return "\n".join(lines)


def columns_in_order(row: dict) -> list[str]:
    """A row's columns in jsonb's own order (shorter names first), whatever order the dict has."""
    return sorted(row, key=lambda c: (len(c.encode()), c.encode()))


def document(table: TableConfig, change) -> Document:
    """The Document (or tombstone, for a delete) of an accepted change."""
    deleted = change.op in ("delete", "truncate")
    text = "" if deleted or change.row is None else render_document(table, change.row)
    return Document(change.table, change.key_text, change.tenant, text, change.lsn, change.commit_time, deleted)


# --- fact templates --------------------------------------------------------------------------

@dataclass(frozen=True)
class FactTemplate:
    name: str
    question: str
    paraphrases: tuple[str, ...]
    answer: str
    gone: str | None = None

    def fields(self) -> set[str]:
        texts = [self.question, *self.paraphrases, self.answer, *([self.gone] if self.gone else [])]
        return {f for t in texts for f in template_fields(t)}


def _phrasings(questions: list[str], paraphrases: list[str], builtin: bool = True) -> tuple[str, tuple[str, ...]]:
    """(canonical question, its other phrasings): the template's own, then the built-in rewrites."""
    canonical, given = questions[0], [*questions[1:], *paraphrases]
    extra = [p for p in paraphrase.rewrites(canonical) if p not in given] if builtin else []
    return canonical, tuple(dict.fromkeys(p for p in given + extra if p != canonical))


def default_template_name(i: int) -> str:
    """The name of the i-th `[[tables.facts]]` entry that gives none (the arena names it the same)."""
    return f"fact{i}"


def parse_fact_templates(raw: list, where: str, problems: list[str]) -> list[FactTemplate]:
    """Fact templates from `[[tables.facts]]`, every problem reported under `where`."""
    out, names = [], set()
    known = {"name", "question", "paraphrases", "answer", "gone", "rewrites"}
    for i, spec in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(spec, dict):
            problems.append(f"{at}: expected a table ([[tables.facts]])")
            continue
        for key in sorted(set(spec) - known):
            problems.append(f"{at}.{key}: unknown key (known: {', '.join(sorted(known))})")
        name = spec.get("name", default_template_name(i))
        question = spec.get("question")
        questions = [question] if isinstance(question, str) else question
        paraphrases = spec.get("paraphrases", [])
        builtin = spec.get("rewrites", True)
        ok = True
        for key, value, good, expected in (
            ("name", name, isinstance(name, str) and name and name != STATEMENT and name not in names,
             f"a unique template name other than {STATEMENT!r}"),
            ("question", questions, isinstance(questions, list) and questions and all(isinstance(q, str) for q in questions),
             "a question template or a list of them"),
            ("paraphrases", paraphrases, isinstance(paraphrases, list) and all(isinstance(p, str) for p in paraphrases),
             "a list of question templates"),
            ("answer", spec.get("answer"), isinstance(spec.get("answer"), str), "an answer template"),
            ("gone", spec.get("gone"), spec.get("gone") is None or isinstance(spec.get("gone"), str), "a template"),
            ("rewrites", builtin, isinstance(builtin, bool), "true or false (add the built-in paraphrases)"),
        ):
            if not good:
                problems.append(f"{at}.{key}: expected {expected}, got {value!r}")
                ok = False
        if not ok:
            continue
        names.add(name)
        for key, texts in (("question", questions), ("paraphrases", paraphrases), ("answer", [spec["answer"]]),
                           ("gone", [spec["gone"]] if spec.get("gone") else [])):
            for text in texts:
                try:
                    template_fields(text)
                except ValueError as exc:
                    problems.append(f"{at}.{key}: template {text!r}: {exc}")
                    ok = False
        if ok:
            canonical, phrasings = _phrasings(questions, paraphrases, builtin)
            out.append(FactTemplate(name, canonical, phrasings, spec["answer"], spec.get("gone")))
    return out


@functools.lru_cache(maxsize=256)
def _templates(table_name: str, raw_json: str) -> tuple[FactTemplate, ...]:
    problems: list[str] = []
    templates = parse_fact_templates(json.loads(raw_json), f"tables.{table_name}.facts", problems)
    if problems:
        raise PgfreshError("; ".join(problems))
    return tuple(templates)


def fact_templates(table: TableConfig, row: dict) -> tuple[FactTemplate, ...]:
    """The table's fact templates; without `facts`, one question per column of the row; with
    `facts = []`, none (a table whose rows are documents only, such as free-text notes)."""
    if table.facts is not None:
        return _templates(table.name, json.dumps(table.facts, sort_keys=True)) if table.facts else ()
    # Identifiers make poor questions ("What is the id of Blue mug?"): keys, the tenant, *_id.
    skip = set(table.key or []) | ({table.tenant} if table.tenant else set())
    label = next((c for c in ("name", "title", "label") if row.get(c) not in (None, "")), None)
    columns = tuple(c for c in columns_in_order(row) if c not in skip and c != label and c.isidentifier()
                    and c != "id" and not c.endswith("_id"))
    return _default_templates(_heading(table), label, columns)


@functools.lru_cache(maxsize=1024)
def _default_templates(heading: str, label: str | None, columns: tuple[str, ...]) -> tuple[FactTemplate, ...]:
    subject = f"{{{label}}}" if label else f"{heading} {{_key}}"
    out = []
    for col in columns:
        canonical, phrasings = _phrasings([f"What is the {col.replace('_', ' ')} of {subject}?"], [])
        out.append(FactTemplate(f"column:{col}", canonical, phrasings, f"{{{col}}}", None))
    return tuple(out)


# --- facts -------------------------------------------------------------------------------------

def fact_id(tbl: str, key: str, tenant, template: str, kind: str, question: str, answer: str) -> str:
    blob = json.dumps([tbl, key, tenant, template, kind, question, answer], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _fact(change, template: str, kind: str, question: str, paraphrases, answer: str) -> Fact:
    tbl, key = change.table, change.key_text
    return Fact(fact_id(tbl, key, change.tenant, template, kind, question, answer), tbl, key, change.tenant, kind,
                template, question, tuple(paraphrases), answer, change.lsn, change.commit_time)


def _qa(t: FactTemplate, row: dict, answer_template: str):
    """(question, paraphrases, answer), or None when a value it needs is null (nothing to state)."""
    for f in (*template_fields(t.question), *template_fields(answer_template)):
        if f not in row:
            raise RenderError(f"fact template {t.name!r}: the row has no column {f!r}")
        if row[f] in (None, ""):
            return None
    return fill(t.question, row), [fill(p, row) for p in t.paraphrases], fill(answer_template, row).strip()


def render_facts(table: TableConfig, change) -> list[Fact]:
    """The facts of an accepted insert/update/read: the statement, then one per template."""
    row = {**change.row, "_key": _key_label(change.key)}
    facts = [_fact(change, STATEMENT, "statement", render_document(table, change.row), (), "")]
    for t in fact_templates(table, change.row):
        qa = _qa(t, row, t.answer)
        if qa:
            facts.append(_fact(change, t.name, "qa", *qa))
    return facts


def fact_answer(table: TableConfig, template: str, row: dict, key: list) -> str | None:
    """The answer fact template `template` gives over `row` (None: no such template, or the row
    states nothing there); RenderError if the row does not fit it."""
    for t in fact_templates(table, row):
        if t.name == template:
            qa = _qa(t, {**row, "_key": _key_label(key)}, t.answer)
            return qa[2] if qa else None
    return None


def render_gone(table: TableConfig, change, old_row: dict) -> list[Fact]:
    """The "no longer exists" facts of a removed row, from the version last admitted."""
    row = {**old_row, "_key": _key_label(change.key)}
    facts = []
    for t in fact_templates(table, old_row):
        if t.gone:
            qa = _qa(t, row, t.gone)
            if qa:
                facts.append(_fact(change, t.name, "gone", *qa))
    return facts


def _key_label(key: list) -> str:
    return " ".join(value_text(v) for v in key)


# --- configuration -------------------------------------------------------------------------

def _dropped(table: TableConfig, paths: tuple[str, ...]) -> set[str]:
    # problems in the gate section are the gate's to report
    return {c for p in paths for c in parse_policy(table.gate, p, "", []).pii.drop}


def check_config(config) -> list[str]:
    """Every problem in the tables' document and fact templates, each with its key path."""
    problems: list[str] = []
    for i, table in enumerate(config.tables):
        fields: list[tuple[str, str]] = []
        if table.document is not None:
            try:
                fields += [(f"tables[{i}].document", f) for f in template_fields(table.document)]
            except ValueError as exc:
                problems.append(f"tables[{i}].document: template {table.document!r}: {exc}")
        for j, t in enumerate(parse_fact_templates(table.facts or [], f"tables[{i}].facts", problems)):
            fields += [(f"tables[{i}].facts[{j}]", f) for f in sorted(t.fields())]
        dropped = {"document": _dropped(table, ("rag", "train")), "facts": _dropped(table, ("train",))}
        for where, f in fields:
            kind = "document" if where.endswith("document") else "facts"
            if f in dropped[kind]:
                problems.append(f"{where}: names column {f!r}, which tables[{i}].gate.pii.drop removes before rendering")
    return problems


def check_against_columns(config, columns_by_table: dict[str, list[str]]) -> list[str]:
    """Templates that name a column the table does not have (known once the database is)."""
    problems: list[str] = []
    for i, table in enumerate(config.tables):
        columns = columns_by_table.get(table.name)
        if columns is None:
            continue
        named: list[tuple[str, set[str]]] = []
        if table.document:
            named.append((f"tables[{i}].document", set(template_fields(table.document))))
        for j, t in enumerate(parse_fact_templates(table.facts or [], "", [])):
            named.append((f"tables[{i}].facts[{j}]", t.fields() - {"_key"}))
        for where, fields in named:
            for f in sorted(fields - set(columns)):
                problems.append(f"{where}: template names column {f!r}, which {table.name} does not have"
                                f" (columns: {', '.join(columns)})")
    return problems

