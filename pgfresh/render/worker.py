"""The facts worker: change log -> Gate(config, 'train') -> facts, with supersession, exactly once.

One `step` is one short transaction: read the next batch after consumer 'facts', let the gate
decide it (and release what has settled), render the accepted rows' facts, write them, advance.
A crash anywhere rolls the whole step back, so every change is decided and rendered once.

Supersession, per row (table, key): the facts of the new version that are already active stay as
they are (same text, same id: nothing to retrain); the row's other active facts are marked
superseded, `superseded_by` naming the new fact of the same template where there is one; a
returning value (a price back at 10) reactivates its old fact rather than adding a copy.
"""

from __future__ import annotations

import json
import os
import time

from psycopg.types.json import Jsonb

from pgfresh import db
from pgfresh.capture.change import Change, advance, pipeline_of, read_changes, worker_name
from pgfresh.capture.pgoutput import format_lsn
from pgfresh.gate import Gate
from pgfresh.render import Fact, RenderError, plain_table, render_facts, render_gone

CONSUMER = "facts"
HEARTBEAT_SECONDS = 2.0


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


class FactsWorker:
    """Consumer 'facts' of the change log; `step` processes one batch, `close` releases the connection."""

    name = CONSUMER

    def __init__(self, config, batch: int = 500):
        self.config = config
        self.batch = self.max_batch = batch
        self.gate = Gate(config, "train")
        self.tables = {t.name: t for t in config.tables}
        self.pipeline = pipeline_of(config)  # reads its own pipeline's change log, keeps its own position
        self.conn = None
        self._beat = 0.0
        self.counts = {"changes": 0, "accepted": 0, "facts": 0}

    def _connection(self):
        if self.conn is None or self.conn.closed:

            self.conn = db.connect(db.store_dsn(self.config), "facts",
                                   max_txn_seconds=self.config.source.max_txn_seconds, autocommit=True)
            db.migrate(self.conn)
        return self.conn

    def step(self) -> int:
        """Process at most one batch; return how many changes it consumed or released (0: idle)."""
        conn = self._connection()
        started = time.monotonic()
        with conn.transaction():
            changes = read_changes(conn, CONSUMER, self.batch, pipeline=self.pipeline)
            accepted = self.gate.admit(conn, changes)
            released = self.gate.release_due(conn, changes[-1].seq if changes else None, limit=self.batch)
            written = self.write(conn, sorted(accepted + released, key=lambda c: c.seq))
            if changes:
                advance(conn, CONSUMER, changes[-1].seq, pipeline=self.pipeline)
            self._heartbeat(conn, len(changes), len(accepted) + len(released), written)
        self._resize(time.monotonic() - started)
        return len(changes) + len(released)

    def _resize(self, seconds: float) -> None:
        # The step is one transaction: keep it well inside max_txn_seconds whatever the rows cost.
        limit = self.config.source.max_txn_seconds
        if seconds > limit / 4 and self.batch > 10:
            self.batch //= 2
        elif seconds < limit / 20 and self.batch < self.max_batch:
            self.batch = min(self.max_batch, self.batch * 2)

    def write(self, conn, changes: list[Change]) -> int:
        """Render and write the facts of accepted changes, in seq order; returns facts written."""
        if not changes:
            return 0
        truncated = sorted({c.table for c in changes if c.op == "truncate"})
        writes = _FactWrites(conn, [(c.table, c.key_text) for c in changes if c.op != "truncate"], truncated)
        for c in changes:
            table = self.tables.get(c.table) or plain_table(c.table)
            if c.op == "truncate":
                gone = self.gate.removed_rows(conn, c)
                for key in [k for (t, k) in writes.active if t == c.table]:
                    writes.replace(c.table, key, self._gone(conn, table, c, key, gone.get(key)))
            elif c.op == "delete":
                writes.replace(c.table, c.key_text,
                               self._gone(conn, table, c, c.key_text, self.gate.removed_rows(conn, c).get(c.key_text)))
            else:
                try:
                    facts = render_facts(table, c)
                except RenderError as exc:
                    # The gate rendered the same row before accepting it, so this is not expected;
                    # if it happens, the change goes to quarantine rather than stopping the stream.
                    self.gate.reject_accepted(conn, c, "render", str(exc))
                    continue
                writes.replace(c.table, c.key_text, facts)
        writes.write(conn)
        return len(writes.new)

    def _gone(self, conn, table, change: Change, key: str, old_row: dict | None) -> list[Fact]:
        if old_row is None:
            return []
        tenant = change.tenant
        if tenant is None and table.tenant and old_row.get(table.tenant) is not None:
            tenant = str(old_row[table.tenant])  # a truncate removes rows of every tenant: each keeps its own
        removed = Change(change.table, change.op, json.loads(key), None, change.lsn, change.commit_time,
                         tenant=tenant, seq=change.seq)
        try:
            return render_gone(table, removed, old_row)
        except RenderError as exc:
            # A tombstone is never held back: the old facts are superseded all the same.
            self.gate.note(conn, change, "render", f"no 'gone' fact for {key}: {exc}")
            return []

    def _heartbeat(self, conn, changes: int, accepted: int, facts: int) -> None:
        for k, v in (("changes", changes), ("accepted", accepted), ("facts", facts)):
            self.counts[k] += v
        if time.monotonic() - self._beat < HEARTBEAT_SECONDS and not (changes or accepted):
            return
        self._beat = time.monotonic()
        conn.execute(
            "insert into pgfresh.workers (name, pipeline, pid, heartbeat, info) values (%s, %s, %s, now(), %s)"
            " on conflict (name) do update set pid = excluded.pid, heartbeat = now(), info = excluded.info",
            (worker_name(CONSUMER, self.pipeline), self.pipeline, os.getpid(), Jsonb(self.counts)))

    def settling_seconds(self) -> float | None:
        """Seconds until the next row in its settle window is due (None: none waits on time).

        `sync --once` can wait this long to let the last burst of edits settle into facts.
        """
        return self.gate.settling_seconds(self._connection())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
