"""One loop for every consumer of the change log: read, gate, render once, write, advance.

A stage that turns captured changes into something (facts, searchable documents) subclasses
`Consumer` and supplies only its own parts: `render(table, change)` (the row's text for the gate's
dedup and the payload the stage writes, made once per change) and `write(conn, gate, admitted)`
(its sink). `Consumer.step` does the rest, the same way for every stage, per pipeline:

    read_changes -> Gate.admit -> Gate.release_due -> write -> advance        (one transaction)

The gate calls the stage's `render` for each change it would accept (after PII removal) and hands
back what it made with the change (`Admitted`): the row is rendered once, whatever the path.
The transaction commits the gate's decisions, the sink's writes and the consumer's position
together, so a crash anywhere means the batch is done again, never twice (invariant 2).

A consumer reads every pipeline of its config (`[[sources]]`: one per source), each at its own
position, with its own gate (that source's tables): one consumer per stage in a `sync`, however
many sources feed it. Each step's transaction stays well inside `source.max_txn_seconds`:
`BatchSize` halves the batch after a slow step and doubles it back after a quick one (the snapshot
reader in capture/sync.py sizes its chunks with it too). `Heartbeat` keeps the consumer's row in
`pgfresh.workers` (capture's as well).
"""

from __future__ import annotations

import os
import time

from psycopg.types.json import Jsonb

from pgfresh import db
from pgfresh.capture.change import Change, advance, pipeline_of, read_changes, worker_name
from pgfresh.gate import Admitted, Gate, Rendered

HEARTBEAT_SECONDS = 2.0


class BatchSize:
    """How many items the next short transaction takes: halved after a step over a quarter of
    `max_txn_seconds`, doubled (up to `largest`) after one under a twentieth."""

    def __init__(self, largest: int, max_txn_seconds: float, smallest: int = 10):
        self.size = self.largest = largest
        self.limit, self.smallest = max_txn_seconds, smallest

    def took(self, seconds: float) -> None:
        if seconds > self.limit / 4 and self.size > self.smallest:
            self.size = max(self.smallest, self.size // 2)
        elif seconds < self.limit / 20 and self.size < self.largest:
            self.size = min(self.largest, self.size * 2)


class Heartbeat:
    """A worker's row in `pgfresh.workers`: pid, heartbeat time and `info`, at most every HEARTBEAT_SECONDS."""

    def __init__(self, conn, role: str, pipeline: str):
        self.conn, self.name, self.pipeline, self.last = conn, worker_name(role, pipeline), pipeline, 0.0

    def beat(self, info: dict, force: bool = False, conn=None) -> None:
        now = time.monotonic()
        if not force and now - self.last < HEARTBEAT_SECONDS:
            return
        self.last = now
        (conn or self.conn).execute(
            "insert into pgfresh.workers (name, pipeline, pid, heartbeat, info) values (%s, %s, %s, now(), %s)"
            " on conflict (name) do update set pid = excluded.pid, heartbeat = now(), info = excluded.info",
            (self.name, self.pipeline, os.getpid(), Jsonb(info)))


class _Reader:
    """One pipeline of a consumer: its gate (that source's tables), heartbeat and counts."""

    def __init__(self, view, path: str, render, role: str):
        self.pipeline = pipeline_of(view)
        self.gate = Gate(view, path, render)
        self.heartbeat = Heartbeat(None, role, self.pipeline)
        self.counts = {"changes": 0, "accepted": 0, "written": 0}


class Consumer:
    """A stage's consumer of the change log; subclasses set `name`, `path`, `largest_batch` and
    implement `render` and `write` (and, if they need them, `opened`, `after_step`, `closing`)."""

    name: str  # the consumer's name in pgfresh.consumers ('facts', 'index')
    path: str  # the gate's path: 'train' or 'rag'

    def __init__(self, config, dsn: str | None = None, batch: int = 500):
        self.config = config
        self.dsn = dsn
        self.tables = {t.name: t for t in config.tables}
        self.readers = [_Reader(view, self.path, self.render, self.name) for view in config.source_views()]
        self.batch = BatchSize(batch, config.source.max_txn_seconds)
        self.conn = None

    # -- the parts a stage supplies ------------------------------------------------------------
    def render(self, table, change: Change) -> Rendered:
        """The row of an accepted insert/update/read (PII removed): dedup text and payload; RenderError if it cannot."""
        raise NotImplementedError

    def write(self, conn, gate: Gate, admitted: list[Admitted]) -> int:
        """Write the admitted changes (seq order) to the stage's sink, in the step's transaction; returns items written."""
        raise NotImplementedError

    def opened(self, conn) -> None:
        """Called once the consumer's connection is open (and migrated)."""

    def after_step(self, consumed: int) -> int:
        """Work of the stage outside the step's transaction; returns how much it did (0: idle)."""
        return 0

    def closing(self) -> None:
        """Release what `opened` took (the connection is closed after)."""

    # -- the loop ------------------------------------------------------------------------------
    def connect(self):
        if self.conn is None or self.conn.closed:
            self.conn = db.connect(self.dsn or db.store_dsn(self.config), self.name, autocommit=True,
                                   max_txn_seconds=self.config.source.max_txn_seconds)
            db.migrate(self.conn)
            self.opened(self.conn)
        return self.conn

    def step(self) -> int:
        """One batch of every pipeline, then the stage's own work; how much was done (0: idle)."""
        conn = self.connect()
        consumed = sum(self._step(conn, r) for r in self.readers)
        return consumed + self.after_step(consumed)

    def _step(self, conn, r: _Reader) -> int:
        started = time.monotonic()
        with conn.transaction():
            changes = read_changes(conn, self.name, self.batch.size, pipeline=r.pipeline)
            admitted = r.gate.admit(conn, changes)
            released = r.gate.release_due(conn, changes[-1].seq if changes else None, limit=self.batch.size)
            both = sorted(admitted + released, key=lambda a: a.change.seq)
            written = self.write(conn, r.gate, both) if both else 0
            if changes:
                advance(conn, self.name, changes[-1].seq, pipeline=r.pipeline)
            for k, v in (("changes", len(changes)), ("accepted", len(both)), ("written", written)):
                r.counts[k] += v
            r.heartbeat.beat(r.counts, conn=conn)
        self.batch.took(time.monotonic() - started)
        return len(changes) + len(released)

    def settling_seconds(self) -> float | None:
        """Seconds until the next row in a settle window of this consumer's gates is due (None: none waits
        on time); `sync --once` waits this long so the last burst of edits settles in."""
        conn = self.connect()
        waits = [s for s in (r.gate.settling_seconds(conn) for r in self.readers) if s is not None]
        return min(waits) if waits else None

    def close(self) -> None:
        self.closing()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
