"""The replication stream: pgoutput over a logical replication connection, as whole transactions.

`Stream.poll()` returns the transactions committed since the last call, each a `Transaction` with
its `Change`s in commit order. Changes are only handed out once their transaction's Commit arrived,
so a sink never sees half a transaction. With protocol version 2 (PostgreSQL 14+) pgfresh asks for
`streaming`, so a huge transaction is sent while it runs instead of piling up in the server's
memory; its pieces are buffered here until Stream Commit (or dropped on Stream Abort, per
subtransaction).

`Stream.confirm(lsn)` tells the server everything up to `lsn` is safely stored, so it may recycle
WAL; capture calls it only after the sink transaction covering `lsn` committed. When the stream is
idle, `idle_position()` is the server's sent position, safe to confirm so an idle database does not
retain WAL.

psycopg 3 has no replication protocol, so this module uses psycopg2's LogicalReplicationConnection.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass, field
from datetime import datetime

import psycopg2
import psycopg2.errors
import psycopg2.extras

from pgfresh.capture import pgoutput as po
from pgfresh.capture.change import Change
from pgfresh.errors import ConnectionLostError, DecodeError, SourceError


@dataclass
class Transaction:
    xid: int
    end_lsn: int
    commit_time: datetime
    changes: list[Change] = field(default_factory=list)


class Stream:
    """One replication connection reading a slot from `start_lsn`."""

    def __init__(self, dsn: str, slot: str, publication: str, start_lsn: str, keys: dict[str, list[str]],
                 tenants: dict[str, str | None]):
        self.keys = keys
        self.tenants = tenants
        self.decoder = po.Decoder()
        try:
            self.conn = psycopg2.connect(
                dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                application_name="pgfresh-stream", options="-c TimeZone=UTC -c DateStyle=ISO -c extra_float_digits=1",
            )
        except psycopg2.OperationalError as exc:
            raise ConnectionLostError(f"cannot open a replication connection ({str(exc).strip().splitlines()[0]}); "
                              "check pg_hba.conf allows replication for this role") from None
        self.cur = self.conn.cursor()
        options = {"proto_version": "1", "publication_names": publication}
        if self.conn.server_version >= 140000:
            options.update(proto_version="2", streaming="on")
        try:
            self.cur.start_replication(slot_name=slot, decode=False, start_lsn=start_lsn, status_interval=5,
                                       options=options)
        except psycopg2.errors.ObjectInUse:
            raise SourceError(f"replication slot {slot} is in use: is another pgfresh sync running?") from None
        self._open: Transaction | None = None  # the transaction being received (Begin seen, no Commit yet)
        self._streamed: dict[int, list[tuple[int, Change]]] = {}  # top xid -> [(subxid, change)]
        self._stream_xid: int | None = None
        self.last_end_lsn = 0  # end LSN of the last complete transaction received
        self.confirmed = 0
        self._last_feedback = 0.0
        self.messages = 0

    # -- reading ---------------------------------------------------------------------------------
    def poll(self, max_messages: int = 20_000, timeout: float = 0.1) -> list[Transaction]:
        """Read what has arrived (waiting up to `timeout` when nothing has) and return whole transactions."""
        done: list[Transaction] = []
        for _ in range(max_messages):
            msg = self.cur.read_message()
            if msg is None:
                if done or timeout <= 0:
                    break
                select.select([self.conn], [], [], timeout)
                timeout = 0
                continue
            self.messages += 1
            tx = self._handle(self.decoder.decode(msg.payload, msg.data_start))
            if tx is not None:
                done.append(tx)
        return done

    def _handle(self, m) -> Transaction | None:
        if isinstance(m, po.RowMessage):
            self._add(self._change(m), m.xid)
        elif isinstance(m, po.Begin):
            self._open = Transaction(m.xid, 0, m.commit_time)
        elif isinstance(m, po.Commit):
            tx, self._open = self._open, None
            if tx is None:
                raise DecodeError(f"Commit at {po.format_lsn(m.end_lsn)} without Begin")
            tx.end_lsn, tx.commit_time = m.end_lsn, m.commit_time
            self.last_end_lsn = m.end_lsn
            for c in tx.changes:
                c.lsn, c.commit_time = m.end_lsn, m.commit_time
            return tx
        elif isinstance(m, po.Truncate):
            for rel in m.relations:
                self._add(Change(rel.qualified, "truncate", [], None, 0, None), m.xid)
        elif isinstance(m, po.StreamStart):
            self._stream_xid = m.xid
            self._streamed.setdefault(m.xid, [])
        elif isinstance(m, po.StreamStop):
            self._stream_xid = None
        elif isinstance(m, po.StreamCommit):
            parts = self._streamed.pop(m.xid, [])
            tx = Transaction(m.xid, m.end_lsn, m.commit_time, [c for _, c in parts])
            self.last_end_lsn = m.end_lsn
            for c in tx.changes:
                c.xid, c.lsn, c.commit_time = m.xid, m.end_lsn, m.commit_time
            return tx
        elif isinstance(m, po.StreamAbort):
            if m.xid == m.subxid:
                self._streamed.pop(m.xid, None)
            else:  # a subtransaction rolled back: drop only its changes
                self._streamed[m.xid] = [(s, c) for s, c in self._streamed.get(m.xid, []) if s != m.subxid]
        # Relation, Type, Origin and logical messages carry nothing to apply (the decoder keeps relations).
        return None

    def _add(self, change: Change, subxid: int | None) -> None:
        if self._stream_xid is not None:
            self._streamed[self._stream_xid].append((subxid, change))
        elif self._open is not None:
            change.xid = self._open.xid
            self._open.changes.append(change)
        else:
            raise DecodeError(f"change to {change.table} outside a transaction")

    def _change(self, m: po.RowMessage) -> Change:
        rel = m.relation
        table = rel.qualified
        if table not in self.keys:  # left the config, still in the WAL: the row store counts and drops it
            return Change(table, m.op, [], None, 0, None)
        key_cols = self.keys.get(table) or rel.key_columns
        if not key_cols:
            raise SourceError(
                f"table {table} has no primary key: add one, or set key in pgfresh.toml and run "
                f"ALTER TABLE {table} REPLICA IDENTITY FULL"
            )
        tenant_col = self.tenants.get(table)
        if m.op == "delete":
            old = m.old or {}
            return Change(table, "delete", [old.get(k) for k in key_cols], None, 0, None,
                          tenant=_text(old.get(tenant_col)) if tenant_col else None)
        row = m.new
        unchanged = self.decoder.unchanged  # set by the new tuple, decoded last
        key = [row.get(k) for k in key_cols]
        old_key = None
        if m.old is not None and any(k in m.old for k in key_cols):
            candidate = [m.old.get(k) for k in key_cols]
            if candidate != key:
                old_key = candidate
        change = Change(table, m.op, key, row, 0, None, old_key=old_key,
                        tenant=_text(row.get(tenant_col)) if tenant_col else None)
        change.unchanged = tuple(unchanged)
        return change

    # -- positions -------------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self._open is not None or bool(self._streamed)

    def idle_position(self) -> int:
        """The server's sent position, when no transaction is half received; else 0."""
        if self.in_transaction:
            return 0
        return self.cur.wal_end or 0

    def request_position(self) -> None:
        """Ask the server for a keepalive now, so `idle_position` is current."""
        self.cur.send_feedback(reply=True)

    def confirm(self, lsn: int, force: bool = False) -> None:
        """Tell the server everything up to `lsn` is stored: it may recycle that WAL.

        psycopg2 only records the position and sends it every status_interval; we send at most once
        a second ourselves, and always on close, so the slot follows closely without chatter.
        """
        if not lsn:
            return
        self.confirmed = max(self.confirmed, lsn)
        now = time.monotonic()
        force = force or now - self._last_feedback > 1.0
        if force:
            self._last_feedback = now
        self.cur.send_feedback(write_lsn=lsn, flush_lsn=lsn, apply_lsn=lsn, force=force)

    def close(self) -> None:
        try:
            if self.confirmed:
                self.confirm(self.confirmed, force=True)
            self.conn.close()
        except psycopg2.Error:
            pass


def _text(v) -> str | None:
    return None if v is None else str(v)
