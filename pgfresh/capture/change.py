"""`Change`: one committed row change, the record every later stage receives.

Capture writes each change it applied to the row store into `pgfresh.changes` (the change log), in
the same transaction. A later stage is a *consumer* of that log: it reads changes after its own
position with `read_changes`, does its work, and calls `advance` in the same transaction as its
own writes, so each consumer sees every change exactly once, whatever crashes in between. The log
is pruned (pgfresh/retention.py); a consumer that is behind its pipeline's pruned point first gets
the row store's current rows of that pipeline (`read_changes` says how), then follows the log again.

Several pipelines (each a slot + publication + its tables; issue 10 calls them sources) can share
one database: every change-log entry and every consumer position is keyed by the pipeline, whose
name is the slot's (`pipeline_of`). A consumer reads only its own pipeline's changes.
"""

from __future__ import annotations

import json

import orjson
from dataclasses import dataclass
from datetime import datetime

from psycopg import sql

from pgfresh.capture.pgoutput import parse_lsn

DEFAULT_PIPELINE = "pgfresh"  # the default slot's name: existing installations' rows belong to it


def pipeline_of(config) -> str:
    """The pipeline a config runs: named after its slot (one slot, one position in the stream)."""
    return config.source.slot


def worker_name(role: str, pipeline: str) -> str:
    """Heartbeat name in pgfresh.workers: the role, suffixed with a non-default pipeline."""
    return role if pipeline == DEFAULT_PIPELINE else f"{role}@{pipeline}"


@dataclass(slots=True)
class Change:
    table: str  # schema.table
    op: str  # insert | update | delete | read (snapshot) | truncate
    key: list  # the key's values, in key-column order
    row: dict | None  # the full new row (None for delete / truncate)
    lsn: int  # end LSN of the source transaction (0 for a snapshot read)
    commit_time: datetime | None
    xid: int | None = None  # source transaction id (stream only)
    old_key: list | None = None  # the key before an update that changed it
    tenant: str | None = None
    seq: int | None = None  # position in pgfresh.changes, once logged
    unchanged: tuple = ()  # TOASTed columns the stream did not resend (the row store fills them in)
    _key_text: str | None = None
    _row_json: str | None = None  # the row serialised once (capture writes it twice)

    @property
    def key_text(self) -> str:
        if self._key_text is None:
            self._key_text = key_text(self.key)
        return self._key_text


def key_text(values: list) -> str:
    """Canonical text form of a key: the same values always give the same text.

    Equal to json.dumps(values, separators=(",", ":"), ensure_ascii=False); orjson is ~10x faster
    and this runs for every change.
    """
    return orjson.dumps(values, default=str).decode()


def row_json(row: dict | None) -> str | None:
    """A row as JSON text for COPY into a jsonb column (None stays SQL NULL)."""
    return None if row is None else orjson.dumps(row, default=str).decode()


def read_changes(conn, consumer: str, limit: int = 1000, tables: list[str] | None = None,
                 pipeline: str = DEFAULT_PIPELINE) -> list[Change]:
    """The next changes of `pipeline` after `consumer`'s position (registering the consumer on first use).

    Call inside the transaction that will also `advance` the consumer.

    A consumer whose position is behind the log's pruned horizon (a stage enabled after the log
    was pruned, or one that was switched off while the log moved on) cannot follow the log: it
    first gets the current version of every row in the row store, as 'read' changes (tombstones as
    'delete' changes too, if it consumed the log before), a page per call, then the log from the
    position it had when the backfill started. Backfill changes carry fresh numbers from the log's
    sequence (unique, never in the log), and `advance` leaves the position alone until it is done.
    """
    conn.execute(
        "insert into pgfresh.consumers (pipeline, name, seq) values (%s, %s, 0) on conflict (pipeline, name) do nothing",
        (pipeline, consumer))
    pos, cursor = conn.execute("select seq, backfill_cursor from pgfresh.consumers where pipeline = %s and name = %s"
                               " for update", (pipeline, consumer)).fetchone()
    if cursor is None and pos < pruned_through(conn, pipeline):
        pos, cursor = _start_backfill(conn, pipeline, consumer, pos), []
    if cursor is not None:
        page = _backfill_page(conn, pipeline, consumer, cursor, limit, tables)
        if page:
            return page
    query = sql.SQL(
        "select seq, tbl, key, tenant, op, row, lsn::text, commit_time from pgfresh.changes"
        " where pipeline = %s and seq > %s {} order by seq limit %s"
    ).format(sql.SQL("and tbl = any(%s)") if tables else sql.SQL(""))
    params = (pipeline, pos, tables, limit) if tables else (pipeline, pos, limit)
    return [_change(*r) for r in conn.execute(query, params)]


def _change(seq, tbl, key, tenant, op, row, lsn, ctime) -> Change:
    return Change(tbl, op, json.loads(key), row, parse_lsn(lsn), ctime, tenant=tenant, seq=seq, _key_text=key)


def pruned_through(conn, pipeline: str = DEFAULT_PIPELINE) -> int:
    """Every change-log entry of `pipeline` up to this seq may have been pruned (0: the log is whole)."""
    row = conn.execute("select pruned_through from pgfresh.retention where pipeline = %s and name = 'changes'",
                       (pipeline,)).fetchone()
    return row[0] if row else 0


def _start_backfill(conn, pipeline: str, consumer: str, pos: int) -> int:
    """Start handing out the row store; returns the log position to resume at afterwards."""
    # The row store is at least as new as the log's last committed entry: resume the log there once
    # every row was handed out. (Capture is the log's only writer, so seq order is commit order.)
    return conn.execute(
        "update pgfresh.consumers set"
        " seq = greatest(%s, (select coalesce(max(seq), 0) from pgfresh.changes where pipeline = %s)),"
        " backfill_cursor = '{}', backfill_deletes = %s, updated_at = now() where pipeline = %s and name = %s"
        " returning seq",
        (pruned_through(conn, pipeline), pipeline, pos > 0, pipeline, consumer)).fetchone()[0]


def _backfill_page(conn, pipeline: str, consumer: str, cursor: list, limit: int,
                   tables: list[str] | None) -> list[Change]:
    """The next `limit` rows of `pipeline`'s row store after `cursor`, as changes; [] (and done) at the end."""
    (deletes,) = conn.execute("select backfill_deletes from pgfresh.consumers where pipeline = %s and name = %s",
                              (pipeline, consumer)).fetchone()
    where = [sql.SQL("pipeline = %(pipeline)s"), sql.SQL("(deleted is false or %(deletes)s)")]
    if cursor:
        where.append(sql.SQL("(tbl, key) > (%(tbl)s, %(key)s)"))
    if tables:
        where.append(sql.SQL("tbl = any(%(tables)s)"))
    query = sql.SQL(
        "select nextval(pg_get_serial_sequence('pgfresh.changes', 'seq')), tbl, key, tenant,"
        " case when deleted then 'delete' else 'read' end, row, lsn::text, commit_time"
        " from (select * from pgfresh.rows where {} order by tbl, key limit %(limit)s) r order by tbl, key"
    ).format(sql.SQL(" and ").join(where))
    params = {"pipeline": pipeline, "deletes": deletes, "tbl": cursor[0] if cursor else None,
              "key": cursor[1] if cursor else None, "tables": tables, "limit": limit}
    page = [_change(*r) for r in conn.execute(query, params)]
    if page:
        conn.execute("update pgfresh.consumers set backfill_cursor = %s, updated_at = now()"
                     " where pipeline = %s and name = %s", ([page[-1].table, page[-1].key_text], pipeline, consumer))
    else:
        conn.execute("update pgfresh.consumers set backfill_cursor = null, backfilled_at = now(), updated_at = now()"
                     " where pipeline = %s and name = %s", (pipeline, consumer))
    return page


def advance(conn, consumer: str, seq: int, pipeline: str = DEFAULT_PIPELINE) -> None:
    """Record that `consumer` has processed `pipeline`'s log up to `seq` (same transaction as its writes).

    While the consumer backfills from the row store its log position stays where the backfill
    started (the changes it was handed are not in the log).
    """
    conn.execute(
        "update pgfresh.consumers set seq = greatest(seq, %s), updated_at = now()"
        " where pipeline = %s and name = %s and backfill_cursor is null", (seq, pipeline, consumer))
