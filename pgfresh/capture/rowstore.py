"""The row store sink: `pgfresh.rows` holds the current state of every captured row.

Exactly once: each batch of streamed transactions is applied in ONE database transaction together
with the change-log entries (`pgfresh.changes`) and the stream position (`pgfresh.sink_progress`).
After a crash, capture restarts from that stored position and `apply_transactions` skips any
transaction whose end LSN it already stored, so nothing is applied twice and nothing is lost.

Source and store: `RowStore` writes only to the store (its `conn`); the source connection is used
for reads alone: snapshot chunks, and the xid8 reference that widens a stream xid. Each chunk is read
in its own short REPEATABLE READ transaction on the source, which closes before the rows are applied
in the store's transaction (which also holds the table's progress row, so chunks never overlap).

Snapshot reconciliation (docs/ARCHITECTURE.md, "Snapshot without a long transaction"): a snapshot
chunk is read in its own short REPEATABLE READ transaction that also records
`pg_current_snapshot()`. Each row the chunk wrote keeps that snapshot in `rows.snap`. A streamed
change whose transaction is *visible* in that snapshot is already contained in the chunk and is
skipped for that key; one that is not visible is newer and wins. Conversely a chunk row does not
overwrite a key whose last streamed change is invisible to the chunk's snapshot (the stream is
newer). Deletes leave a tombstone row (`deleted`), so a chunk read before the delete cannot
resurrect the row.

Pipelines: everything here (rows, change log, sink position, snapshot progress) is keyed by the
pipeline the store was opened for, so several pipelines share a database without sharing state.
Changes of tables the pipeline does not (or no longer) capture are never applied: they are counted
per table in `pgfresh.dropped_changes`, in the same transaction as the batch.

Tenants: a DELETE carries only the replica-identity columns, so a delete (and the old key of a key
change) takes its tenant from the stored row; migration 005's triggers reject a row or change of a
tenant table that would be stored without one.

Resync (`pgfresh resync`, after a lost slot): `mark_resync` records the new slot's start and a
marker transaction and queues every table for a new snapshot; when a table's last chunk is read,
`_RESYNC_DELETES` tombstones the rows no new chunk saw and no new streamed change touched, and logs
each as a delete, so documents, facts and cache entries follow through the change log.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from pgfresh.capture import pgoutput as po
from pgfresh.capture.change import DEFAULT_PIPELINE, Change, key_text, row_json
from pgfresh.capture.setup import TableInfo
from pgfresh.capture.stream import Transaction
from pgfresh.errors import ConfigError

SINK = "rows"

_STAGE = """
create temp table if not exists pgfresh_stage (
    ord integer, tbl text, key text, tenant text, op text, row jsonb, lsn pg_lsn, commit_time timestamptz, xid xid8,
    last boolean, versions integer
) on commit delete rows
"""

_LOG_STAGE = """
insert into pgfresh.changes (pipeline, tbl, key, tenant, op, row, lsn, commit_time)
select %(pipeline)s, tbl, key, tenant, op, row, lsn, commit_time from pgfresh_stage order by ord
"""

# `last` and `versions` (the key's last change in the batch, how many it had) are set by capture, which
# saves the server a sort and a window over the batch.
_UPSERT_STREAM = """
insert into pgfresh.rows as r (pipeline, tbl, key, tenant, row, lsn, commit_time, deleted, xid, snap, versions)
select %(pipeline)s, tbl, key, tenant, row, lsn, commit_time, op = 'delete', xid, null::pg_snapshot, versions
from pgfresh_stage where last
on conflict (pipeline, tbl, key) do update set
    tenant = excluded.tenant, row = excluded.row, lsn = excluded.lsn, commit_time = excluded.commit_time,
    deleted = excluded.deleted, xid = excluded.xid, snap = null, versions = r.versions + excluded.versions
"""

_UPSERT_CHUNK = """
with up as (
    insert into pgfresh.rows as r (pipeline, tbl, key, tenant, row, lsn, commit_time, deleted, xid, snap, versions)
    select %(pipeline)s, tbl, key, tenant, row, '0/0', null, false, null, %(snap)s::pg_snapshot, 1 from pgfresh_stage
    on conflict (pipeline, tbl, key) do update set
        tenant = excluded.tenant, row = excluded.row, deleted = false, snap = excluded.snap
        where r.xid is null or pg_visible_in_snapshot(r.xid, excluded.snap)
    returning tbl, key
)
insert into pgfresh.changes (pipeline, tbl, key, tenant, op, row, lsn, commit_time)
select %(pipeline)s, s.tbl, s.key, s.tenant, 'read', s.row, '0/0', null from pgfresh_stage s join up using (tbl, key)
order by s.ord
"""

# Resync, one place for its SQL. A row the new snapshot read carries a chunk snapshot in which the
# marker transaction resync_xid is visible; a row streamed after resync_lsn is current. Any other
# live row is gone from the source: tombstone it and log a delete with its last known row.
_RESYNC_MARK = """
insert into pgfresh.snapshot_progress (pipeline, tbl, resync_xid, resync_lsn)
values (%(pipeline)s, %(tbl)s, %(xid)s::xid8, %(lsn)s)
on conflict (pipeline, tbl) do update set last_key = null, done = false, rows_read = 0, truncate_xid = null,
    reconcile_until = null, started_at = now(), finished_at = null,
    resync_xid = excluded.resync_xid, resync_lsn = excluded.resync_lsn, resync_deleted = null
"""

_RESYNC_DELETES = """
with mark as (
    select resync_xid, resync_lsn from pgfresh.snapshot_progress
    where pipeline = %(pipeline)s and tbl = %(tbl)s and resync_xid is not null
), gone as (
    -- commit_time: the resync's, by which retention ages the tombstone (the source's is unknown).
    update pgfresh.rows r set deleted = true, lsn = m.resync_lsn, commit_time = now(), xid = null, snap = null,
        versions = r.versions + 1
    from mark m
    where r.pipeline = %(pipeline)s and r.tbl = %(tbl)s and not r.deleted and r.lsn <= m.resync_lsn
      and (r.snap is null or not pg_visible_in_snapshot(m.resync_xid, r.snap))
    returning r.tbl, r.key, r.tenant, r.row, r.lsn
), logged as (
    insert into pgfresh.changes (pipeline, tbl, key, tenant, op, row, lsn, commit_time)
    select %(pipeline)s, tbl, key, tenant, 'delete', row, lsn, null from gone order by key
    returning 1
), counted as (
    update pgfresh.snapshot_progress set resync_xid = null, resync_deleted = (select count(*) from logged)
    where pipeline = %(pipeline)s and tbl = %(tbl)s and resync_xid is not null
)
select count(*) from logged
"""


def mark_resync(conn: psycopg.Connection, pipeline: str, tables: list[str], slot_lsn: str,
                source: psycopg.Connection | None = None) -> None:
    """Queue `tables` for a resync snapshot that starts at `slot_lsn` (the new slot's start).

    Commits one marker transaction on the source first (`source`, default `conn`): every chunk read
    after it sees it (see _RESYNC_DELETES). The marker writes nothing; it only takes an xid.
    """
    source = source or conn
    with source.transaction():
        (xid,) = source.execute("select pg_current_xact_id()::text").fetchone()  # assigns, then commits, an xid
    with conn.transaction():
        conn.execute("insert into pgfresh.sink_progress (pipeline, sink, lsn) values (%s, %s, %s)"
                     " on conflict (pipeline, sink) do update set lsn = excluded.lsn, updated_at = now()",
                     (pipeline, SINK, slot_lsn))
        for tbl in tables:
            conn.execute(_RESYNC_MARK, {"pipeline": pipeline, "tbl": tbl, "xid": xid, "lsn": slot_lsn})


def resync_counts(conn: psycopg.Connection, pipeline: str) -> dict[str, dict]:
    """Per table of the last resync: rows re-read, rows deleted (None while its snapshot is still running)."""
    rows = conn.execute("select tbl, rows_read, resync_deleted from pgfresh.snapshot_progress"
                        " where pipeline = %s and resync_lsn is not null order by tbl", (pipeline,)).fetchall()
    return {t: {"rows_read": read, "deleted": deleted} for t, read, deleted in rows}


@dataclass
class Snapshot:
    """A pg_snapshot (xmin:xmax:xip) for visibility tests in Python."""

    xmin: int
    xmax: int
    xip: frozenset

    @classmethod
    def parse(cls, text: str) -> "Snapshot":
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def visible(self, xid8: int) -> bool:
        """Was the (committed) transaction xid8 already committed when this snapshot was taken?"""
        return xid8 < self.xmin or (xid8 < self.xmax and xid8 not in self.xip)


def _json(c: Change) -> str | None:
    """The change's row as JSON text, serialised once for the stage and the change log."""
    if c._row_json is None and c.row is not None:
        c._row_json = row_json(c.row)
    return c._row_json


_N = "\\N"  # NULL in COPY's text format
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """A text value as a field of COPY's text format (backslash, tab, newline and CR escaped)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def full_xid(xid32: int, reference: int) -> int:
    """Widen a 32-bit xid from the stream to xid8, given any xid8 known to be newer."""
    full = (reference & ~0xFFFFFFFF) | xid32
    if full >= reference:
        full -= 1 << 32
    return full


def register_tables(conn: psycopg.Connection, pipeline: str, infos: dict[str, TableInfo], config_path: str,
                    source: psycopg.Connection | None = None) -> None:
    """Record the pipeline's configured tables (with tenant columns and source database) in pgfresh.tables; commit.

    A stored table name belongs to one pipeline: one configured in another pipeline is refused
    (ConfigError) before anything is created when that pipeline reads another source database
    (two databases' tables of the same name: `[[sources]]` names them apart), or when its slot
    still exists on the source (`source`, an autocommit connection; default `conn`). A table that
    left the config is kept, marked not configured (its changes are dropped from now on); one that
    comes back is snapshotted again.
    """
    source = source if source is not None else conn
    (source_id,) = source.execute("select system_identifier || '/' || current_database() from pg_control_system()"
                                  ).fetchone()
    names = sorted(infos)
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('pgfresh.tables'))")
        problems = []
        for t, p, other in conn.execute(
                "select tbl, pipeline, source from pgfresh.tables where tbl = any(%s) and pipeline <> %s and configured"
                " order by tbl", (names, pipeline)).fetchall():
            if other is not None and other != source_id:
                problems.append(f"table {t} of another source database ({other}) is captured by pipeline {p} into "
                                "this store; the same name in two databases needs [[sources]], which keeps each "
                                "source's tables apart (name:schema.table): docs/CONFIG.md")
            # A pipeline whose slot is gone (renamed, dropped) no longer holds its tables.
            elif source.execute("select exists (select 1 from pg_replication_slots where slot_name = %s"
                                " and database = current_database())", (p,)).fetchone()[0]:
                problems.append(f"table {t} is captured by pipeline {p} (slot {p}) on this database; a table belongs "
                                f"to one pipeline: remove it from one of the configs, or drop slot {p} if that "
                                "pipeline is gone")
        if problems:
            raise ConfigError(problems, config_path)
        conn.execute("delete from pgfresh.tables where tbl = any(%s) and pipeline <> %s", (names, pipeline))
        back = [t for (t,) in conn.execute(
            "select tbl from pgfresh.tables where pipeline = %s and tbl = any(%s) and not configured", (pipeline, names))]
        if back:  # changes were dropped while it was away: read it again
            conn.execute("delete from pgfresh.snapshot_progress where pipeline = %s and tbl = any(%s)", (pipeline, back))
        conn.cursor().executemany(
            "insert into pgfresh.tables (pipeline, tbl, tenant_column, source) values (%s, %s, %s, %s)"
            " on conflict (pipeline, tbl) do update set tenant_column = excluded.tenant_column, configured = true,"
            " source = excluded.source, updated_at = now()",
            [(pipeline, n, infos[n].tenant, source_id) for n in names])
        conn.execute("update pgfresh.tables set configured = false, updated_at = now()"
                     " where pipeline = %s and configured and tbl <> all(%s)", (pipeline, names))


class RowStore:
    """Applies streamed transactions and snapshot chunks to pgfresh.rows, logging each applied change."""

    def __init__(self, conn: psycopg.Connection, infos: dict[str, TableInfo], pipeline: str = DEFAULT_PIPELINE,
                 source: psycopg.Connection | None = None):
        """`conn`: the store (autocommit off or on); `source`: an autocommit connection to the source,
        never the same connection as `conn`."""
        self.conn = conn
        self.source = source if source is not None else conn
        self.infos = infos
        self.pipeline = pipeline
        self.tenant_prefix = ""  # [[sources]]: the source's tenant scope, before each tenant value read here
        conn.execute(_STAGE)
        conn.commit()
        self._stage_dirty = False  # pgfresh_stage may hold rows (it empties itself when a transaction ends)
        self.snapshot_pending = self._pending_tables()
        self.reconcile_until = self._reconcile_until()

    # -- positions -------------------------------------------------------------------------------
    def stored_lsn(self) -> int:
        row = self.conn.execute("select lsn::text from pgfresh.sink_progress where pipeline = %s and sink = %s",
                                (self.pipeline, SINK)).fetchone()
        self.conn.commit()
        return po.parse_lsn(row[0]) if row else 0

    def start(self, slot_lsn: str, created: bool) -> None:
        """Record the starting position; on a new slot, queue a snapshot of every table."""
        with self.conn.transaction():
            self.conn.execute(
                "insert into pgfresh.sink_progress (pipeline, sink, lsn) values (%s, %s, %s)"
                " on conflict (pipeline, sink) do nothing", (self.pipeline, SINK, slot_lsn))
            for name in self.infos:
                # A table added to the config later gets its snapshot too; a new slot re-reads everything.
                if created:
                    self.conn.execute("delete from pgfresh.snapshot_progress where pipeline = %s and tbl = %s",
                                      (self.pipeline, name))
                self.conn.execute(
                    "insert into pgfresh.snapshot_progress (pipeline, tbl) values (%s, %s)"
                    " on conflict (pipeline, tbl) do nothing", (self.pipeline, name))
        self.snapshot_pending = self._pending_tables()
        self.reconcile_until = self._reconcile_until()

    def _reconcile_until(self) -> dict[str, int]:
        rows = self.conn.execute("select tbl, reconcile_until::text from pgfresh.snapshot_progress"
                                 " where pipeline = %s and reconcile_until is not null", (self.pipeline,)).fetchall()
        return {t: po.parse_lsn(lsn) for t, lsn in rows}

    def _pending_tables(self) -> list[str]:
        names = [r[0] for r in self.conn.execute(
            "select tbl from pgfresh.snapshot_progress where pipeline = %s and not done order by tbl",
            (self.pipeline,))]
        self.conn.commit()
        return [n for n in names if n in self.infos]

    # -- stream ----------------------------------------------------------------------------------
    def apply_transactions(self, txs: list[Transaction]) -> list[Change]:
        """Apply whole transactions (skipping ones already stored) in one DB transaction; commit."""
        with self._transaction():
            (stored,) = self.conn.execute(
                "select lsn::text from pgfresh.sink_progress where pipeline = %s and sink = %s for update",
                (self.pipeline, SINK)).fetchone()
            stored = po.parse_lsn(stored)
            txs = [t for t in txs if t.end_lsn > stored]
            if not txs:
                return []
            # The stream's 32-bit xids widen against the SOURCE's current xid8 (the store's counter is unrelated).
            (ref,) = self.source.execute("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
            changes = [c for t in txs for c in t.changes if c.table in self.infos]
            self._count_dropped([c for t in txs for c in t.changes if c.table not in self.infos])
            for c in changes:
                c.xid = full_xid(c.xid, ref) if c.xid is not None else None
            applied = self._apply_changes(changes)
            self.conn.execute("update pgfresh.sink_progress set lsn = %s, updated_at = now()"
                              " where pipeline = %s and sink = %s", (po.format_lsn(txs[-1].end_lsn), self.pipeline, SINK))
        return applied

    def _count_dropped(self, dropped: list[Change]) -> None:
        """Count changes of tables this pipeline does not capture (left the config, still in flight)."""
        if not dropped:
            return
        counts: dict[str, list] = {}
        for c in dropped:
            n = counts.setdefault(c.table, [0, 0])
            n[0] += 1
            n[1] = max(n[1], c.lsn)
        self.conn.cursor().executemany(
            "insert into pgfresh.dropped_changes (pipeline, tbl, changes, last_lsn) values (%s, %s, %s, %s)"
            " on conflict (pipeline, tbl) do update set changes = pgfresh.dropped_changes.changes + excluded.changes,"
            " last_lsn = excluded.last_lsn, updated_at = now()",
            [(self.pipeline, t, n, po.format_lsn(lsn)) for t, (n, lsn) in counts.items()])

    def _state(self, changes: list[Change]) -> dict[tuple[str, str], tuple[dict | None, Snapshot | None, str | None]]:
        """Stored row, chunk snapshot and tenant for the keys that need them (TOAST fill, deletes,
        snapshot in progress)."""
        # A change may already be inside a chunk only if its table is still being read, or if it
        # committed before the table's last chunk was read (WAL position recorded with the chunk).
        pending = set(self.snapshot_pending)
        until = self.reconcile_until
        wanted = {(c.table, c.key_text) for c in changes
                  if c.unchanged or c.op == "delete" or c.old_key is not None or c.table in pending
                  or c.lsn <= until.get(c.table, 0)}
        if not wanted:
            return {}
        tbls, keys = zip(*wanted)
        rows = self.conn.execute(
            "select r.tbl, r.key, r.row, r.snap::text, r.tenant from pgfresh.rows r"
            " join unnest(%s::text[], %s::text[]) w(tbl, key) using (tbl, key) where r.pipeline = %s",
            (list(tbls), list(keys), self.pipeline))
        return {(t, k): (row, Snapshot.parse(s) if s else None, tenant) for t, k, row, s, tenant in rows}

    def _apply_changes(self, changes: list[Change]) -> list[Change]:
        state = self._state(changes)
        applied: list[Change] = []
        segment: list[Change] = []  # changes up to the next TRUNCATE, staged and applied together
        for c in changes:
            if c.op == "truncate":
                self._flush(segment)
                segment = []
                self._truncate(c)
                self._log_truncate(c)
                applied.append(c)
                continue
            k = (c.table, c.key_text)
            row, snap, tenant = state.get(k, (None, None, None))
            if snap is not None and c.xid is not None and snap.visible(c.xid):
                continue  # the snapshot chunk that wrote this key already contains this change
            if c.old_key is not None:  # the key itself changed: the old key is gone
                gone = Change(c.table, "delete", c.old_key, None, c.lsn, c.commit_time, c.xid)
                old_k = (c.table, gone.key_text)
                gone.row, _, gone.tenant = state.get(old_k, (None, None, None))
                if gone.row is None:  # never stored: the new version's tenant is the best known
                    gone.tenant = c.tenant
                state[old_k] = (gone.row, None, gone.tenant)
                segment.append(gone)
                applied.append(gone)
            if c.op == "delete":
                c.row = row  # the last known row: later stages render "no longer exists" from it
                if c.tenant is None:  # not in the replica identity: the stored row's tenant
                    c.tenant = tenant
            elif c.unchanged and row is not None:
                c.row = {**{col: row.get(col) for col in c.unchanged}, **c.row}
            state[k] = (c.row, None, c.tenant)
            segment.append(c)
            applied.append(c)
        self._flush(segment)
        return applied

    def _flush(self, changes: list[Change]) -> None:
        """Stage the changes once; the server logs each and upserts the last one per key."""
        if not changes:
            return
        keys = [(c.table, c.key_text) for c in changes]
        last: dict[tuple[str, str], int] = {}  # (table, key) -> index of its last change here
        versions: dict[tuple[str, str], int] = {}
        for i, k in enumerate(keys):
            last[k] = i
            versions[k] = versions.get(k, 0) + 1
        # The fields a transaction's changes share (LSN, commit time, xid) are formatted once per
        # transaction, the table once per table: this loop runs for every change captured.
        shared: dict[tuple, str] = {}
        tables: dict[str, str] = {}
        lines = []
        for i, (c, k) in enumerate(zip(changes, keys)):
            tx = (c.lsn, c.commit_time, c.xid)
            if (tail := shared.get(tx)) is None:
                tail = shared[tx] = "\t".join((po.format_lsn(c.lsn), _N if c.commit_time is None else str(c.commit_time),
                                                _N if c.xid is None else str(c.xid)))
            if (tbl := tables.get(c.table)) is None:
                tbl = tables[c.table] = _copy_text(c.table)
            row = _json(c)
            lines.append(f"{i}\t{tbl}\t{_copy_text(k[1])}\t{_N if c.tenant is None else _copy_text(c.tenant)}\t{c.op}\t"
                         f"{_N if row is None else _copy_text(row)}\t{tail}\t{'t' if last[k] == i else 'f'}\t{versions[k]}")
        lines.append("")
        cur = self._stage()
        with cur.copy("copy pgfresh_stage (ord, tbl, key, tenant, op, row, lsn, commit_time, xid, last, versions)"
                      " from stdin") as cp:
            cp.write("\n".join(lines))
        cur.execute(_LOG_STAGE, {"pipeline": self.pipeline})
        cur.execute(_UPSERT_STREAM, {"pipeline": self.pipeline})

    def _stage(self) -> psycopg.Cursor:
        """A cursor, with pgfresh_stage empty (it empties itself when a transaction ends; a second
        use in one transaction, after a TRUNCATE in the batch, empties it here)."""
        cur = self.conn.cursor()
        if self._stage_dirty:
            cur.execute("truncate pgfresh_stage")
        self._stage_dirty = True
        return cur

    @contextmanager
    def _transaction(self):
        """The store transaction of one batch or chunk; the stage is empty after it if it was a
        transaction of its own (not a savepoint in the caller's)."""
        own = self.conn.info.transaction_status == TransactionStatus.IDLE
        try:
            with self.conn.transaction():
                yield
        finally:
            if own:
                self._stage_dirty = False

    def _truncate(self, c: Change) -> None:
        self.conn.execute(
            "update pgfresh.rows set deleted = true, lsn = %s, commit_time = %s, xid = %s::xid8, snap = null"
            " where pipeline = %s and tbl = %s and not deleted",
            (po.format_lsn(c.lsn), c.commit_time, str(c.xid), self.pipeline, c.table))
        self.conn.execute("update pgfresh.snapshot_progress set truncate_xid = %s::xid8"
                          " where pipeline = %s and tbl = %s and not done", (str(c.xid), self.pipeline, c.table))

    def _log_truncate(self, c: Change) -> None:
        self.conn.execute("insert into pgfresh.changes (pipeline, tbl, key, tenant, op, row, lsn, commit_time)"
                          " values (%s, %s, '[]', null, 'truncate', null, %s, %s)",
                          (self.pipeline, c.table, po.format_lsn(c.lsn), c.commit_time))

    # -- snapshot --------------------------------------------------------------------------------
    def snapshot_step(self, max_rows: int) -> tuple[int, float]:
        """Read and apply the next chunk of the first unfinished table. Returns (rows read, seconds)."""
        if not self.snapshot_pending:
            return 0, 0.0
        name = self.snapshot_pending[0]
        info = self.infos[name]
        started = time.monotonic()
        conn = self.conn
        with self._transaction():
            last_key, truncate_xid = conn.execute(
                "select last_key, truncate_xid::text from pgfresh.snapshot_progress"
                " where pipeline = %s and tbl = %s for update", (self.pipeline, name)).fetchone()
            snap_text, wal_pos, rows = self._read_source(info, last_key, max_rows)
            snap = Snapshot.parse(snap_text)
            skip = truncate_xid is not None and not snap.visible(int(truncate_xid))
            if not skip:
                self._apply_chunk(info, rows, snap_text)
            key_idx = [info.columns.index(k) for k in info.key]
            new_last = [rows[-1][i] for i in key_idx] if rows else last_key
            done = len(rows) < max_rows
            conn.execute(
                "update pgfresh.snapshot_progress set last_key = %s, rows_read = rows_read + %s, done = %s,"
                " finished_at = case when %s then now() end, reconcile_until = %s where pipeline = %s and tbl = %s",
                (Jsonb(new_last), len(rows), done, done, wal_pos, self.pipeline, name))
            if done:  # a resync ends here, in the last chunk's transaction: exactly once
                conn.execute(_RESYNC_DELETES, {"tbl": name, "pipeline": self.pipeline})
        self.reconcile_until[name] = po.parse_lsn(wal_pos)
        if done:
            self.snapshot_pending.pop(0)
        return len(rows), time.monotonic() - started

    def _read_source(self, info: TableInfo, last_key: list | None, limit: int) -> tuple[str, str, list[tuple]]:
        """One chunk from the source in its own short REPEATABLE READ transaction, closed before the
        store applies it: (pg_current_snapshot, WAL insert position, rows)."""
        source = self.source
        if source is self.conn:
            raise ValueError("RowStore needs a source connection of its own for snapshot reads")
        source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        try:
            with source.transaction():
                snap_text, wal_pos = source.execute(
                    "select pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text").fetchone()
                rows = self._read_chunk(info, last_key, limit)
        finally:
            source.isolation_level = None
        return snap_text, wal_pos, rows

    def _read_chunk(self, info: TableInfo, last_key: list | None, limit: int) -> list[tuple]:
        keys = sql.SQL(", ").join(sql.Identifier(k) for k in info.key)
        where = sql.SQL("")
        params: list = []
        if last_key is not None:
            casts = sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Placeholder(), sql.SQL(info.types[info.columns.index(k)]))
                for k in info.key)
            where = sql.SQL("where ({}) > ({})").format(keys, casts)
            params = list(last_key)
        query = sql.SQL("copy (select {} from {} {} order by {} limit {}) to stdout").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in info.columns), info.ident, where, keys, sql.Literal(limit))
        cur = self.source.cursor()
        with cur.copy(query, params or None) as cp:
            return list(cp.rows())

    def _apply_chunk(self, info: TableInfo, rows: list[tuple], snap_text: str) -> int:
        """Stage the chunk's rows; the server keeps those the stream has not superseded and logs them."""
        if not rows:
            return 0
        cols, convs = info.columns, [po.converter(o) for o in info.type_oids]
        key_idx = [cols.index(k) for k in info.key]
        tenant_idx = cols.index(info.tenant) if info.tenant else None
        tbl, prefix, lines = _copy_text(info.name), self.tenant_prefix, []
        for i, raw in enumerate(rows):
            row = {c: (v if f is None or v is None else f(v)) for c, f, v in zip(cols, convs, raw)}
            tenant = raw[tenant_idx] if tenant_idx is not None else None
            lines.append(f"{i}\t{tbl}\t{_copy_text(key_text([row[cols[j]] for j in key_idx]))}\t"
                         f"{_N if tenant is None else _copy_text(prefix + tenant)}\t{_copy_text(row_json(row))}\n")
        cur = self._stage()
        with cur.copy("copy pgfresh_stage (ord, tbl, key, tenant, row) from stdin") as cp:
            cp.write("".join(lines))
        cur.execute(_UPSERT_CHUNK, {"snap": snap_text, "pipeline": self.pipeline})
        return cur.rowcount
