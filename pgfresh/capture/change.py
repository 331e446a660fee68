"""`Change`: one committed row change, the record every later stage receives.

Capture writes each change it applied to the row store into `pgfresh.changes` (the change log), in
the same transaction. A later stage is a *consumer* of that log: it reads changes after its own
position with `read_changes`, does its work, and calls `advance` in the same transaction as its
own writes, so each consumer sees every change exactly once, whatever crashes in between.

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
    """
    conn.execute(
        "insert into pgfresh.consumers (pipeline, name, seq) values (%s, %s, 0) on conflict (pipeline, name) do nothing",
        (pipeline, consumer))
    (pos,) = conn.execute("select seq from pgfresh.consumers where pipeline = %s and name = %s for update",
                          (pipeline, consumer)).fetchone()
    query = sql.SQL(
        "select seq, tbl, key, tenant, op, row, lsn::text, commit_time from pgfresh.changes"
        " where pipeline = %s and seq > %s {} order by seq limit %s"
    ).format(sql.SQL("and tbl = any(%s)") if tables else sql.SQL(""))
    params = (pipeline, pos, tables, limit) if tables else (pipeline, pos, limit)
    out = []
    for seq, tbl, key, tenant, op, row, lsn, ctime in conn.execute(query, params):
        hi, lo = lsn.split("/")
        out.append(Change(tbl, op, json.loads(key), row, (int(hi, 16) << 32) | int(lo, 16), ctime,
                          tenant=tenant, seq=seq))
    return out


def advance(conn, consumer: str, seq: int, pipeline: str = DEFAULT_PIPELINE) -> None:
    """Record that `consumer` has processed `pipeline`'s log up to `seq` (same transaction as its writes)."""
    conn.execute(
        "update pgfresh.consumers set seq = greatest(seq, %s), updated_at = now() where pipeline = %s and name = %s",
        (seq, pipeline, consumer))
