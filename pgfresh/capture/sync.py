"""`pgfresh sync`: the capture loop, and the downstream workers it drives.

One process, one thread, one direction: read whole transactions from the stream, apply them to the
row store (one short sink transaction per batch, LSN stored with it), confirm the slot only up to
what committed, interleave snapshot chunks until every table has been read, then let each
downstream worker (gate/render facts, RAG index) consume the change log. `--once` stops when the
stream has reached the WAL position current at start, the snapshot is complete and every worker is
idle. SIGTERM/SIGINT finish the current batch, then exit. Every `retention.prune_interval_seconds`
(and once on exit) it prunes what `[retention]` allows (pgfresh/retention.py), in short batches.

No transaction opened here lives longer than `source.max_txn_seconds`: a batch is bounded in
changes and seconds, a snapshot chunk shrinks when it takes more than a quarter of the limit, and
on PostgreSQL 17+ the server enforces the limit itself (`transaction_timeout`).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from pgfresh import config as cfg
from pgfresh import db
from pgfresh import retention
from pgfresh.capture import pgoutput as po
from pgfresh.capture import setup
from pgfresh.capture.rowstore import RowStore
from pgfresh.capture.stream import Stream

# Later stages that run inside `pgfresh sync`, and when: the facts worker when a table has fact
# templates or [train] is present, the RAG index when [rag] is present (`pgfresh init` writes it).
DOWNSTREAM_MODULES = {
    "pgfresh.render": lambda c: "train" in c.sections or any(t.facts for t in c.tables),
    "pgfresh.rag": lambda c: "rag" in c.sections,
}
HEARTBEAT_SECONDS = 2.0


def downstream_workers(config: cfg.Config) -> list:
    """Workers of the later stages, in data-flow order (each module's `workers(config)`)."""
    wanted = [name for name, asked in DOWNSTREAM_MODULES.items() if asked(config)]
    return [w for workers in cfg.stage_functions(wanted, "workers") for w in workers(config)]


def check_stage_columns(config: cfg.Config, infos: dict) -> None:
    """Templates and validators that name columns the tables lack: all reported before anything runs."""
    columns = {name: info.columns for name, info in infos.items()}
    problems = [p for check in cfg.stage_functions(("pgfresh.gate", "pgfresh.render"), "check_against_columns")
                for p in check(config, columns)]
    if problems:
        from pgfresh.errors import ConfigError

        raise ConfigError(problems, str(config.path))


class _Heartbeat:
    def __init__(self, conn, name: str):
        self.conn, self.name, self.last = conn, name, 0.0

    def beat(self, info: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < HEARTBEAT_SECONDS:
            return
        self.last = now
        from psycopg.types.json import Jsonb

        self.conn.execute(
            "insert into pgfresh.workers (name, pid, heartbeat, info) values (%s, %s, now(), %s)"
            " on conflict (name) do update set pid = excluded.pid, heartbeat = now(), info = excluded.info",
            (self.name, os.getpid(), Jsonb(info)))

    def error(self, exc: BaseException) -> None:
        try:
            self.conn.execute(
                "insert into pgfresh.workers (name, last_error, last_error_at) values (%s, %s, now())"
                " on conflict (name) do update set last_error = excluded.last_error, last_error_at = now()",
                (self.name, f"{type(exc).__name__}: {exc}"[:2000]))
        except Exception:  # the database itself may be what failed; the error is re-raised anyway
            pass


def run(config: cfg.Config, once: bool = False, console=None, stop: threading.Event | None = None,
        workers: list | None = None) -> dict:
    """Capture until stopped (or, with once, until caught up). Returns counts for the caller.

    `workers`: the downstream workers to drive (default: those the config asks for). Workers
    passed in stay open for the caller's next run (the arena keeps its embedder loaded).
    """
    stop = stop or threading.Event()
    dsn = setup.resolve_dsn(config)
    src = config.source
    conn = db.connect(dsn, "capture", max_txn_seconds=src.max_txn_seconds, autocommit=True)
    infos = setup.check_source(conn, config)  # everything checked before anything is created
    check_stage_columns(config, infos)
    db.migrate(conn)
    setup.ensure_publication(conn, config)
    slot_lsn, created = setup.ensure_slot(conn, config)
    store = RowStore(conn, infos)
    store.start(slot_lsn, created)
    start_lsn = store.stored_lsn()
    stream = Stream(dsn, src.slot, src.publication, po.format_lsn(start_lsn),
                    {n: i.key for n, i in infos.items()}, {n: i.tenant for n, i in infos.items()})
    own_workers = workers is None
    workers = downstream_workers(config) if own_workers else workers
    heartbeat = _Heartbeat(conn, "capture")
    previous_handlers = _install_signals(stop)
    target = po.parse_lsn(conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]) if once else None
    stats = {"changes": 0, "transactions": 0, "snapshot_rows": 0, "lsn": po.format_lsn(start_lsn), "lag_seconds": 0.0}
    try:
        _loop(config, store, stream, workers, heartbeat, stats, stop, target, start_lsn, console)
    except BaseException as exc:
        heartbeat.error(exc)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        stream.close()
        for w in workers if own_workers else []:
            w.close()
        conn.close()
    return stats


def _loop(config, store, stream, workers, heartbeat, stats, stop, target, processed, console) -> None:
    src = config.source
    chunk_rows = src.snapshot_chunk_rows
    batch, batch_changes, batch_started = [], 0, 0.0
    last_prune = time.monotonic()
    keep = retention.settings(config)
    consumers = [w.name for w in workers]  # a consumer the config no longer runs holds nothing back
    while True:
        txs = stream.poll(timeout=0.02 if (batch or store.snapshot_pending) else 0.25)
        if txs and not batch:
            batch_started = time.monotonic()
        batch.extend(txs)
        batch_changes += sum(len(t.changes) for t in txs)
        due = batch and (not txs or stop.is_set() or batch_changes >= src.batch_max_changes
                         or time.monotonic() - batch_started >= src.batch_max_seconds)
        if due:
            applied = store.apply_transactions(batch)
            processed = max(processed, batch[-1].end_lsn)
            stream.confirm(processed)  # only now: the sink transaction has committed
            stats["changes"] += len(applied)
            stats["lag_seconds"] = round(time.time() - batch[-1].commit_time.timestamp(), 3)
            stats["transactions"] += len(batch)
            batch, batch_changes = [], 0
        elif not batch and not txs:
            idle = stream.idle_position()
            if idle > processed:
                processed = idle
                stats["lag_seconds"] = 0.0
                stream.confirm(idle)  # idle: confirm so an idle database does not retain WAL
        if store.snapshot_pending and not stop.is_set():
            rows, seconds = store.snapshot_step(chunk_rows)
            stats["snapshot_rows"] += rows
            # Keep every chunk transaction well inside max_txn_seconds, whatever the row width.
            if seconds > src.max_txn_seconds / 4 and chunk_rows > 100:
                chunk_rows //= 2
            elif seconds < src.max_txn_seconds / 20 and chunk_rows < src.snapshot_chunk_rows:
                chunk_rows = min(src.snapshot_chunk_rows, chunk_rows * 2)
        busy = sum(w.step() for w in workers) if workers else 0
        stats["lsn"] = po.format_lsn(processed)
        heartbeat.beat({"lsn": stats["lsn"], "changes": stats["changes"], "lag_seconds": stats["lag_seconds"],
                        "snapshot_pending": store.snapshot_pending})
        if time.monotonic() - last_prune > keep.prune_interval_seconds:
            retention.prune(store.conn, config, consumers)
            last_prune = time.monotonic()
        if stop.is_set() and not batch:
            break
        if target is not None and not batch and not store.snapshot_pending:
            if processed >= target and not txs and not busy:
                break
            if not txs:
                stream.request_position()
    heartbeat.beat({"lsn": stats["lsn"], "changes": stats["changes"], "lag_seconds": stats["lag_seconds"],
                    "snapshot_pending": []}, force=True)
    retention.prune(store.conn, config, consumers)


def _install_signals(stop: threading.Event) -> dict:
    """SIGTERM/SIGINT set `stop`; returns the previous handlers, which `run` puts back."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, handler)
    return previous

