"""The facts worker: change log -> Gate(config, 'train') -> facts, with supersession, exactly once.

The loop is `pgfresh.consume.Consumer`'s (read, gate, advance in one short transaction, batch
sizing, heartbeat); this module supplies the facts stage's parts: `render` (a row's facts, made
once, inside the gate, which deduplicates on their text) and `write` (the facts with supersession).
A crash anywhere rolls the whole step back, so every change is decided and rendered once.

Supersession, per row (table, key): the facts of the new version that are already active stay as
they are (same text, same id: nothing to retrain); the row's other active facts are marked
superseded, `superseded_by` naming the new fact of the same template where there is one; a
returning value (a price back at 10) reactivates its old fact rather than adding a copy.
"""

from __future__ import annotations

import json

from pgfresh import render
from pgfresh.capture.change import Change
from pgfresh.capture.pgoutput import format_lsn
from pgfresh.consume import Consumer
from pgfresh.gate import Admitted, Gate, Rendered
from pgfresh.render import Fact, RenderError, plain_table

CONSUMER = "facts"


class _FactWrites:
    """The final state of every fact a step touches, written at the end in two statements."""

    def __init__(self, conn, rows: list[tuple[str, str]], tables: list[str]):
        self.active: dict[tuple[str, str], dict[str, str]] = {}  # (tbl, key) -> {fact_id: template}
        for fid, tbl, key, template in conn.execute(
                "select f.fact_id, f.tbl, f.key, f.template from pgfresh.facts f"
                " where f.status = 'active' and ((f.tbl, f.key) in (select * from unnest(%s::text[], %s::text[]))"
                " or f.tbl = any(%s))", ([t for t, _ in rows], [k for _, k in rows], tables)):
            self.active.setdefault((tbl, key), {})[fid] = template
        self.new: dict[str, Fact] = {}
        self.state: dict[str, tuple[str, str | None]] = {}  # fact_id -> (status, superseded_by)

    def replace(self, tbl: str, key: str, facts: list[Fact]) -> None:
        """The row (tbl, key) now stands for exactly `facts`; its other active facts are superseded."""
        old = self.active.get((tbl, key), {})
        by_template = {}
        for f in facts:
            by_template.setdefault(f.template, f.fact_id)
            if f.fact_id not in old:
                self.new[f.fact_id] = f
                self.state[f.fact_id] = ("active", None)
        kept = {f.fact_id for f in facts}
        for fid, template in old.items():
            if fid not in kept:
                self.state[fid] = ("superseded", by_template.get(template))
        self.active[(tbl, key)] = {f.fact_id: f.template for f in facts}

    def write(self, conn) -> None:
        inserts = [(f.fact_id, f.tbl, f.key, f.tenant, f.kind, f.template, f.question, list(f.paraphrases), f.answer,
                    format_lsn(f.lsn), f.commit_time, *self.state[f.fact_id]) for f in self.new.values()]
        updates = [(by, fid) for fid, (status, by) in self.state.items() if status == "superseded" and fid not in self.new]
        with conn.cursor() as cur:
            if updates:
                cur.executemany("update pgfresh.facts set status = 'superseded', superseded_by = %s,"
                                " superseded_at = now() where fact_id = %s and status = 'active'", updates)
            if inserts:
                cur.executemany(
                    "insert into pgfresh.facts (fact_id, tbl, key, tenant, kind, template, question, paraphrases,"
                    " answer, lsn, commit_time, status, superseded_by, superseded_at) values (%s, %s, %s, %s, %s, %s,"
                    " %s, %s, %s, %s::pg_lsn, %s, %s, %s, case when %s = 'superseded' then now() end)"
                    " on conflict (fact_id) do update set status = excluded.status,"
                    " superseded_by = excluded.superseded_by, superseded_at = excluded.superseded_at,"
                    " lsn = excluded.lsn, commit_time = excluded.commit_time",
                    [r + (r[-2],) for r in inserts])


class FactsWorker(Consumer):
    """Consumer 'facts' of the change log (path 'train'): `render` makes a row's facts, `write` stores them."""

    name = CONSUMER
    path = "train"

    def __init__(self, config, dsn: str | None = None, batch: int = 500):
        super().__init__(config, dsn, batch)

    def render(self, table, change: Change) -> Rendered:
        """The row's facts (the statement first); the gate deduplicates on all their text."""
        facts = render.render_facts(table, change)
        text = "\n".join([facts[0].question] + [p for f in facts[1:] for p in (f.question, *f.paraphrases, f.answer)])
        return Rendered(facts[0].question, text, facts)

    def write(self, conn, gate: Gate, admitted: list[Admitted]) -> int:
        """Write the facts of the admitted changes, in seq order, with supersession; returns facts written."""
        changes = [a.change for a in admitted]
        truncated = sorted({c.table for c in changes if c.op == "truncate"})
        writes = _FactWrites(conn, [(c.table, c.key_text) for c in changes if c.op != "truncate"], truncated)
        for a in admitted:
            c = a.change
            table = self.tables.get(c.table) or plain_table(c.table)
            if c.op == "truncate":
                gone = gate.removed_rows(conn, c)
                for key in [k for (t, k) in writes.active if t == c.table]:
                    writes.replace(c.table, key, self._gone(conn, gate, table, c, key, gone.get(key)))
            elif c.op == "delete":
                writes.replace(c.table, c.key_text,
                               self._gone(conn, gate, table, c, c.key_text, gate.removed_rows(conn, c).get(c.key_text)))
            else:
                writes.replace(c.table, c.key_text, a.rendered.payload)
        writes.write(conn)
        return len(writes.new)

    def _gone(self, conn, gate: Gate, table, change: Change, key: str, old_row: dict | None) -> list[Fact]:
        if old_row is None:
            return []
        tenant = change.tenant
        if tenant is None and table.tenant and old_row.get(table.tenant) is not None:
            tenant = str(old_row[table.tenant])  # a truncate removes rows of every tenant: each keeps its own
        removed = Change(change.table, change.op, json.loads(key), None, change.lsn, change.commit_time,
                         tenant=tenant, seq=change.seq)
        try:
            return render.render_gone(table, removed, old_row)
        except RenderError as exc:
            # A tombstone is never held back: the old facts are superseded all the same.
            gate.note(conn, change, "render", f"no 'gone' fact for {key}: {exc}")
            return []
