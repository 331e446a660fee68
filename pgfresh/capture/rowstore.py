"""The row store sink: `pgfresh.rows` holds the current state of every captured row.

Exactly once: each batch of streamed transactions is applied in ONE database transaction together
with the change-log entries (`pgfresh.changes`) and the stream position (`pgfresh.sink_progress`).
After a crash, capture restarts from that stored position and `apply_transactions` skips any
transaction whose end LSN it already stored, so nothing is applied twice and nothing is lost.

Snapshot reconciliation (docs/ARCHITECTURE.md, "Snapshot without a long transaction"): a snapshot
chunk is read in its own short REPEATABLE READ transaction that also records
`pg_current_snapshot()`. Each row the chunk wrote keeps that snapshot in `rows.snap`. A streamed
change whose transaction is *visible* in that snapshot is already contained in the chunk and is
skipped for that key; one that is not visible is newer and wins. Conversely a chunk row does not
overwrite a key whose last streamed change is invisible to the chunk's snapshot (the stream is
newer). Deletes leave a tombstone row (`deleted`), so a chunk read before the delete cannot
resurrect the row.

Resync (`pgfresh resync`, after a lost slot): `mark_resync` records the new slot's start and a
marker transaction and queues every table for a new snapshot; when a table's last chunk is read,
`_RESYNC_DELETES` tombstones the rows no new chunk saw and no new streamed change touched, and logs
each as a delete, so documents, facts and cache entries follow through the change log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgfresh.capture import pgoutput as po
from pgfresh.capture.change import Change, key_text, row_json
from pgfresh.capture.setup import TableInfo
from pgfresh.capture.stream import Transaction

SINK = "rows"

_STAGE = """
create temp table if not exists pgfresh_stage (
    ord integer, tbl text, key text, tenant text, op text, row jsonb, lsn pg_lsn, commit_time timestamptz, xid xid8
) on commit delete rows
"""

_LOG_STAGE = """
insert into pgfresh.changes (tbl, key, tenant, op, row, lsn, commit_time)
select tbl, key, tenant, op, row, lsn, commit_time from pgfresh_stage order by ord
"""

_UPSERT_STREAM = """
insert into pgfresh.rows as r (tbl, key, tenant, row, lsn, commit_time, deleted, xid, snap, versions)
select distinct on (tbl, key) tbl, key, tenant, row, lsn, commit_time, op = 'delete', xid, null::pg_snapshot,
       count(*) over (partition by tbl, key)
from pgfresh_stage order by tbl, key, ord desc
on conflict (tbl, key) do update set
    tenant = excluded.tenant, row = excluded.row, lsn = excluded.lsn, commit_time = excluded.commit_time,
    deleted = excluded.deleted, xid = excluded.xid, snap = null, versions = r.versions + excluded.versions
"""

_UPSERT_CHUNK = """
with up as (
    insert into pgfresh.rows as r (tbl, key, tenant, row, lsn, commit_time, deleted, xid, snap, versions)
    select tbl, key, tenant, row, '0/0', null, false, null, %(snap)s::pg_snapshot, 1 from pgfresh_stage
    on conflict (tbl, key) do update set
        tenant = excluded.tenant, row = excluded.row, deleted = false, snap = excluded.snap
        where r.xid is null or pg_visible_in_snapshot(r.xid, excluded.snap)
    returning tbl, key
)
insert into pgfresh.changes (tbl, key, tenant, op, row, lsn, commit_time)
select s.tbl, s.key, s.tenant, 'read', s.row, '0/0', null from pgfresh_stage s join up using (tbl, key) order by s.ord
"""

# Resync, one place for its SQL. A row the new snapshot read carries a chunk snapshot in which the
# marker transaction resync_xid is visible; a row streamed after resync_lsn is current. Any other
# live row is gone from the source: tombstone it and log a delete with its last known row.
_RESYNC_MARK = """
insert into pgfresh.snapshot_progress (tbl, resync_xid, resync_lsn) values (%(tbl)s, %(xid)s::xid8, %(lsn)s)
on conflict (tbl) do update set last_key = null, done = false, rows_read = 0, truncate_xid = null,
    reconcile_until = null, started_at = now(), finished_at = null,
    resync_xid = excluded.resync_xid, resync_lsn = excluded.resync_lsn, resync_deleted = null
"""

_RESYNC_DELETES = """
with mark as (
    select resync_xid, resync_lsn from pgfresh.snapshot_progress where tbl = %(tbl)s and resync_xid is not null
), gone as (
    update pgfresh.rows r set deleted = true, lsn = m.resync_lsn, commit_time = null, xid = null, snap = null,
        versions = r.versions + 1
    from mark m
    where r.tbl = %(tbl)s and not r.deleted and r.lsn <= m.resync_lsn
      and (r.snap is null or not pg_visible_in_snapshot(m.resync_xid, r.snap))
    returning r.tbl, r.key, r.tenant, r.row, r.lsn
), logged as (
    insert into pgfresh.changes (tbl, key, tenant, op, row, lsn, commit_time)
    select tbl, key, tenant, 'delete', row, lsn, null from gone order by key
    returning 1
), counted as (
    update pgfresh.snapshot_progress set resync_xid = null, resync_deleted = (select count(*) from logged)
    where tbl = %(tbl)s and resync_xid is not null
)
select count(*) from logged
"""


def mark_resync(conn: psycopg.Connection, tables: list[str], slot_lsn: str) -> None:
    """Queue `tables` for a resync snapshot that starts at `slot_lsn` (the new slot's start).

    Commits one marker transaction first: every chunk read after it sees it (see _RESYNC_DELETES).
    """
    with conn.transaction():
        (xid,) = conn.execute("select pg_current_xact_id()::text").fetchone()  # assigns this transaction's xid
        conn.execute("insert into pgfresh.sink_progress (sink, lsn) values (%s, %s) on conflict (sink)"
                     " do update set lsn = excluded.lsn, updated_at = now()", (SINK, slot_lsn))
        for tbl in tables:
            conn.execute(_RESYNC_MARK, {"tbl": tbl, "xid": xid, "lsn": slot_lsn})


def resync_counts(conn: psycopg.Connection) -> dict[str, dict]:
    """Per table of the last resync: rows re-read, rows deleted (None while its snapshot is still running)."""
    rows = conn.execute("select tbl, rows_read, resync_deleted from pgfresh.snapshot_progress"
                        " where resync_lsn is not null order by tbl").fetchall()
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


def full_xid(xid32: int, reference: int) -> int:
    """Widen a 32-bit xid from the stream to xid8, given any xid8 known to be newer."""
    full = (reference & ~0xFFFFFFFF) | xid32
    if full >= reference:
        full -= 1 << 32
    return full


class RowStore:
    """Applies streamed transactions and snapshot chunks to pgfresh.rows, logging each applied change."""

    def __init__(self, conn: psycopg.Connection, infos: dict[str, TableInfo]):
        self.conn = conn
        self.infos = infos
        conn.execute(_STAGE)
        conn.commit()
        self.snapshot_pending = self._pending_tables()
        self.reconcile_until = self._reconcile_until()

    # -- positions -------------------------------------------------------------------------------
    def stored_lsn(self) -> int:
        row = self.conn.execute("select lsn::text from pgfresh.sink_progress where sink = %s", (SINK,)).fetchone()
        self.conn.commit()
        return po.parse_lsn(row[0]) if row else 0

    def start(self, slot_lsn: str, created: bool) -> None:
        """Record the starting position; on a new slot, queue a snapshot of every table."""
        with self.conn.transaction():
            self.conn.execute(
                "insert into pgfresh.sink_progress (sink, lsn) values (%s, %s) on conflict (sink) do nothing",
                (SINK, slot_lsn))
            for name in self.infos:
                # A table added to the config later gets its snapshot too; a new slot re-reads everything.
                if created:
                    self.conn.execute("delete from pgfresh.snapshot_progress where tbl = %s", (name,))
                self.conn.execute(
                    "insert into pgfresh.snapshot_progress (tbl) values (%s) on conflict (tbl) do nothing", (name,))
        self.snapshot_pending = self._pending_tables()
        self.reconcile_until = self._reconcile_until()

    def _reconcile_until(self) -> dict[str, int]:
        rows = self.conn.execute("select tbl, reconcile_until::text from pgfresh.snapshot_progress"
                                 " where reconcile_until is not null").fetchall()
        return {t: po.parse_lsn(lsn) for t, lsn in rows}

    def _pending_tables(self) -> list[str]:
        names = [r[0] for r in self.conn.execute(
            "select tbl from pgfresh.snapshot_progress where not done order by tbl")]
        self.conn.commit()
        return [n for n in names if n in self.infos]

    # -- stream ----------------------------------------------------------------------------------
    def apply_transactions(self, txs: list[Transaction]) -> list[Change]:
        """Apply whole transactions (skipping ones already stored) in one DB transaction; commit."""
        with self.conn.transaction():
            (stored,) = self.conn.execute(
                "select lsn::text from pgfresh.sink_progress where sink = %s for update", (SINK,)).fetchone()
            stored = po.parse_lsn(stored)
            txs = [t for t in txs if t.end_lsn > stored]
            if not txs:
                return []
            (ref,) = self.conn.execute("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
            changes = [c for t in txs for c in t.changes]
            for c in changes:
                c.xid = full_xid(c.xid, ref) if c.xid is not None else None
            applied = self._apply_changes(changes)
            self.conn.execute("update pgfresh.sink_progress set lsn = %s, updated_at = now() where sink = %s",
                              (po.format_lsn(txs[-1].end_lsn), SINK))
        return applied

    def _state(self, changes: list[Change]) -> dict[tuple[str, str], tuple[dict | None, Snapshot | None]]:
        """Stored row and chunk snapshot for the keys that need them (TOAST fill, deletes, snapshot in progress)."""
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
            "select r.tbl, r.key, r.row, r.snap::text from pgfresh.rows r"
            " join unnest(%s::text[], %s::text[]) w(tbl, key) using (tbl, key)", (list(tbls), list(keys)))
        return {(t, k): (row, Snapshot.parse(s) if s else None) for t, k, row, s in rows}

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
            row, snap = state.get(k, (None, None))
            if snap is not None and c.xid is not None and snap.visible(c.xid):
                continue  # the snapshot chunk that wrote this key already contains this change
            if c.old_key is not None:  # the key itself changed: the old key is gone
                gone = Change(c.table, "delete", c.old_key, None, c.lsn, c.commit_time, c.xid, tenant=c.tenant)
                old_k = (c.table, gone.key_text)
                gone.row = state.get(old_k, (None, None))[0]
                state[old_k] = (gone.row, None)
                segment.append(gone)
                applied.append(gone)
            if c.op == "delete":
                c.row = row  # the last known row: later stages render "no longer exists" from it
            elif c.unchanged and row is not None:
                c.row = {**{col: row.get(col) for col in c.unchanged}, **c.row}
            state[k] = (c.row, None)
            segment.append(c)
            applied.append(c)
        self._flush(segment)
        return applied

    def _flush(self, changes: list[Change]) -> None:
        """Stage the changes once; the server logs each and upserts the last one per key."""
        if not changes:
            return
        cur = self.conn.cursor()
        with cur.copy("copy pgfresh_stage (ord, tbl, key, tenant, op, row, lsn, commit_time, xid) from stdin") as cp:
            for i, c in enumerate(changes):
                cp.write_row((i, c.table, c.key_text, c.tenant, c.op, _json(c), po.format_lsn(c.lsn), c.commit_time,
                              c.xid))
        cur.execute(_LOG_STAGE)
        cur.execute(_UPSERT_STREAM)
        cur.execute("truncate pgfresh_stage")

    def _truncate(self, c: Change) -> None:
        self.conn.execute(
            "update pgfresh.rows set deleted = true, lsn = %s, commit_time = %s, xid = %s::xid8, snap = null"
            " where tbl = %s and not deleted", (po.format_lsn(c.lsn), c.commit_time, str(c.xid), c.table))
        self.conn.execute("update pgfresh.snapshot_progress set truncate_xid = %s::xid8 where tbl = %s and not done",
                          (str(c.xid), c.table))

    def _log_truncate(self, c: Change) -> None:
        self.conn.execute("insert into pgfresh.changes (tbl, key, tenant, op, row, lsn, commit_time)"
                          " values (%s, '[]', null, 'truncate', null, %s, %s)",
                          (c.table, po.format_lsn(c.lsn), c.commit_time))

    # -- snapshot --------------------------------------------------------------------------------
    def snapshot_step(self, max_rows: int) -> tuple[int, float]:
        """Read and apply the next chunk of the first unfinished table. Returns (rows read, seconds)."""
        if not self.snapshot_pending:
            return 0, 0.0
        name = self.snapshot_pending[0]
        info = self.infos[name]
        started = time.monotonic()
        conn = self.conn
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        try:
            with conn.transaction():
                snap_text, wal_pos = conn.execute(
                    "select pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text").fetchone()
                last_key, truncate_xid = conn.execute(
                    "select last_key, truncate_xid::text from pgfresh.snapshot_progress where tbl = %s for update",
                    (name,)).fetchone()
                rows = self._read_chunk(info, last_key, max_rows)
                snap = Snapshot.parse(snap_text)
                skip = truncate_xid is not None and not snap.visible(int(truncate_xid))
                if not skip:
                    self._apply_chunk(info, rows, snap_text)
                key_idx = [info.columns.index(k) for k in info.key]
                new_last = [rows[-1][i] for i in key_idx] if rows else last_key
                done = len(rows) < max_rows
                conn.execute(
                    "update pgfresh.snapshot_progress set last_key = %s, rows_read = rows_read + %s, done = %s,"
                    " finished_at = case when %s then now() end, reconcile_until = %s where tbl = %s",
                    (Jsonb(new_last), len(rows), done, done, wal_pos, name))
                if done:  # a resync ends here, in the last chunk's transaction: exactly once
                    conn.execute(_RESYNC_DELETES, {"tbl": name})
        finally:
            conn.isolation_level = None
        self.reconcile_until[name] = po.parse_lsn(wal_pos)
        if done:
            self.snapshot_pending.pop(0)
        return len(rows), time.monotonic() - started

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
        cur = self.conn.cursor()
        with cur.copy(query, params or None) as cp:
            return list(cp.rows())

    def _apply_chunk(self, info: TableInfo, rows: list[tuple], snap_text: str) -> int:
        """Stage the chunk's rows; the server keeps those the stream has not superseded and logs them."""
        if not rows:
            return 0
        cols, convs = info.columns, [po.converter(o) for o in info.type_oids]
        key_idx = [cols.index(k) for k in info.key]
        tenant_idx = cols.index(info.tenant) if info.tenant else None
        cur = self.conn.cursor()
        with cur.copy("copy pgfresh_stage (ord, tbl, key, tenant, row) from stdin") as cp:
            for i, raw in enumerate(rows):
                row = {c: (v if f is None or v is None else f(v)) for c, f, v in zip(cols, convs, raw)}
                cp.write_row((i, info.name, key_text([row[cols[j]] for j in key_idx]),
                              raw[tenant_idx] if tenant_idx is not None else None, row_json(row)))
        cur.execute(_UPSERT_CHUNK, {"snap": snap_text})
        applied = cur.rowcount
        cur.execute("truncate pgfresh_stage")
        return applied
