"""The replication stream: pgoutput over a logical replication connection, as whole transactions.

`Stream.poll()` returns the transactions committed since the last call, each a `Transaction` with
its `Change`s in commit order. Changes are only handed out once their transaction's Commit arrived,
so a sink never sees half a transaction. With protocol version 2 (PostgreSQL 14+) pgfresh asks for
`streaming`, so a huge transaction is sent while it runs instead of piling up in the server's
memory; its pieces are buffered here until Stream Commit (or dropped on Stream Abort, per
subtransaction).

Reading and decoding run on a thread of their own (`pgfresh-stream`), which alone uses the
replication connection; it reads ahead at most `read_ahead_changes` decoded changes, so the caller's
sink transaction overlaps the decoding of what follows. The caller sees only whole transactions, in
commit order, as before.

`Stream.confirm(lsn)` tells the server everything up to `lsn` is safely stored, so it may recycle
WAL; capture calls it only after the sink transaction covering `lsn` committed, and the server hears
of no other position, with one exception below. When the stream is idle, `idle_position()` is the
server's sent position, safe to confirm so an idle database does not retain WAL.

Why read-ahead cannot confirm an unstored change. psycopg2 moves the flush position it reports on
its own: on a server keepalive, if the position we last confirmed is at or past the start of the
last message read (`explicitly_flushed_lsn >= last_msg_data_start` in its pqpath.c), it reports the
keepalive's WAL position as flushed, in its next status message (every `status_interval`, whoever
calls). Every transaction that committed before that WAL position was sent before the keepalive,
so it was read; the move is safe exactly when every transaction read so far is stored. The reader
therefore never reads (and so never lets psycopg2 see a keepalive) while the move is possible and a
transaction it read is not yet confirmed (`_forward_unsafe`): a Relation message (sent with start
0) or a message of a transaction that began before the confirmed position makes the move possible,
and the reader then waits for the caller to store and confirm what it handed out. A keepalive that
arrives in the middle of a transaction carries a position before that transaction's commit record,
so the server sends that transaction again after a restart.

psycopg 3 has no replication protocol, so this module uses psycopg2's LogicalReplicationConnection.
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

import psycopg2
import psycopg2.errors
import psycopg2.extras

from pgfresh.capture import pgoutput as po
from pgfresh.capture.change import Change
from pgfresh.errors import ConnectionLostError, DecodeError, SourceError

WAKE_SECONDS = 0.01  # the reader's longest wait before it looks at confirms, requests and stop again


@dataclass
class Transaction:
    xid: int
    end_lsn: int
    commit_time: datetime
    changes: list[Change] = field(default_factory=list)


class Stream:
    """One replication connection reading a slot from `start_lsn`, decoded on a thread of its own."""

    def __init__(self, dsn: str, slot: str, publication: str, start_lsn: str, keys: dict[str, list[str]],
                 tenants: dict[str, str | None], read_ahead_changes: int = 20_000):
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
            self.conn.close()
            raise SourceError(f"replication slot {slot} is in use: is another pgfresh sync running?") from None
        # Reader thread only:
        self._open: Transaction | None = None  # the transaction being received (Begin seen, no Commit yet)
        self._streamed: dict[int, list[tuple[int, Change]]] = {}  # top xid -> [(subxid, change)]
        self._stream_xid: int | None = None
        self.last_end_lsn = 0  # end LSN of the last complete transaction read
        self._last_data_start = 0  # start LSN of the last message read (psycopg2's last_msg_data_start)
        self._sent = 0  # the flush position handed to psycopg2 (its explicitly_flushed_lsn)
        self._last_feedback = 0.0
        self.messages = 0
        # Shared, under _cond:
        self._cond = threading.Condition()
        self._ready: deque[Transaction] = deque()
        self._ready_changes = 0
        self._read_ahead = read_ahead_changes
        self._handed = 0  # transactions put in _ready
        self._taken = 0  # transactions poll() returned
        self._idle: tuple[int, int] | None = None  # (sent position, _handed) when the reader last found nothing
        self.confirmed = 0  # the highest position the caller confirmed (stored in the sink)
        self._force = False
        self._reply = False
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pgfresh-stream", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------------
    def poll(self, timeout: float = 0.1, max_changes: int = 5_000) -> list[Transaction]:
        """Whole transactions read since the last call, in commit order, about `max_changes` changes
        at most (always at least one transaction), waiting up to `timeout` when there are none."""
        with self._cond:
            if not self._ready and self._error is None:
                self._cond.wait_for(lambda: self._ready or self._error is not None, timeout)
            if self._error is not None:
                raise self._error
            done, n = [], 0
            while self._ready and (not done or n + len(self._ready[0].changes) <= max_changes):
                tx = self._ready.popleft()
                done.append(tx)
                n += len(tx.changes)
            self._ready_changes -= n
            self._taken += len(done)
            self._cond.notify_all()
        return done

    def idle_position(self) -> int:
        """The server's sent position when every transaction before it was handed out; else 0.

        Safe to confirm once everything `poll` returned is stored: the reader records the position
        only with no transaction half received, and a transaction that committed before it was read
        (and counted in `_handed`) before the server sent it."""
        with self._cond:
            if self._idle is None or self._taken < self._idle[1]:
                return 0
            return self._idle[0]

    def request_position(self) -> None:
        """Ask the server for a keepalive now, so `idle_position` is current."""
        with self._cond:
            self._reply = True

    def confirm(self, lsn: int, force: bool = False) -> None:
        """Tell the server everything up to `lsn` is stored: it may recycle that WAL.

        Call only once the sink transaction covering `lsn` has committed. The reader passes it to
        psycopg2, which sends it every status_interval; the reader sends at most once a second
        itself, and always on close, so the slot follows closely without chatter.
        """
        if not lsn:
            return
        with self._cond:
            if lsn > self.confirmed:
                self.confirmed = lsn
            self._force = self._force or force
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(5.0)
        try:
            if self.confirmed and not self._thread.is_alive():
                self.cur.send_feedback(write_lsn=self.confirmed, flush_lsn=self.confirmed,
                                       apply_lsn=self.confirmed, force=True)
            self.conn.close()
        except psycopg2.Error:
            pass

    # -- the reader thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                    confirmed, force, reply = self.confirmed, self._force, self._reply
                    self._force = self._reply = False
                    wait = self._ready_changes >= self._read_ahead or self._forward_unsafe(confirmed)
                    if wait:
                        self._cond.wait(WAKE_SECONDS)
                self._feedback(confirmed, force, reply)
                if not wait:
                    self._read()
        except BaseException as exc:  # handed to the caller's next poll
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _forward_unsafe(self, confirmed: int) -> bool:
        """Could psycopg2 move the flush position past a transaction read but not yet stored?

        `confirmed` is what `_feedback` is about to hand psycopg2, so the test holds for the next read."""
        return max(self._sent, confirmed) >= self._last_data_start and self.last_end_lsn > confirmed

    def _feedback(self, confirmed: int, force: bool, reply: bool) -> None:
        if confirmed > self._sent or force or reply:
            now = time.monotonic()
            force = force or reply or now - self._last_feedback > 1.0
            if force:
                self._last_feedback = now
            # psycopg2 keeps the highest positions given; 0 leaves them as they are.
            self.cur.send_feedback(write_lsn=confirmed, flush_lsn=confirmed, apply_lsn=confirmed, force=force,
                                   reply=reply)
            self._sent = max(self._sent, confirmed)

    def _read(self) -> None:
        """Read what has arrived, up to a point where the reader must look at confirms again."""
        for _ in range(1000):
            msg = self.cur.read_message()
            if msg is None:
                if self._open is None and not self._streamed:
                    with self._cond:
                        self._idle = (self.cur.wal_end or 0, self._handed)
                select.select([self.conn], [], [], WAKE_SECONDS)
                return
            self.messages += 1
            if not self.messages % 32:
                # Hand the GIL over now and then: the capture loop, back from the store, waits for it
                # otherwise until the interpreter's switch interval (5 ms) ends, on every round trip.
                time.sleep(0)
            self._last_data_start = msg.data_start
            tx = self._handle(self.decoder.decode(msg.payload, msg.data_start))
            if tx is not None:
                with self._cond:
                    self._ready.append(tx)
                    self._ready_changes += len(tx.changes)
                    self._handed += 1
                    self._cond.notify_all()
            # A Relation message (start 0) or an older transaction's message: stop before the next read.
            if msg.data_start <= self._sent or self._ready_changes >= self._read_ahead:
                return

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


def _text(v) -> str | None:
    return None if v is None else str(v)
