"""`pgfresh sync`: the capture loop, and the downstream workers it drives.

One loop per source (`[[sources]]`: a thread each, `run`), one direction: read whole transactions from the stream, apply them to the
row store (one short sink transaction per batch, LSN stored with it), confirm the slot only up to
what committed, interleave snapshot chunks until every table has been read, then let each
downstream worker (gate/render facts, RAG index) consume the change log. `--once` stops when the
stream has reached the WAL position current at start, the snapshot is complete and every worker is
idle. SIGTERM/SIGINT finish the current batch, then exit. Every `retention.prune_interval_seconds`
(and once on exit) it prunes what `[retention]` allows (pgfresh/retention.py), in short batches.

The source going away (restart, crash, network) is not an error: every connection is opened again
with capped backoff and capture resumes from the stored position, exactly once; only after
`source.reconnect_give_up_seconds` without a connection does `sync` exit (code 2). A slot that is
gone or invalidated while a stored position needs it stops `sync` with one line pointing to
`pgfresh resync` (capture/resync.py); it is never silently re-created.

No transaction opened here lives longer than `source.max_txn_seconds`: a batch is bounded in
changes and seconds, a snapshot chunk shrinks when it takes more than a quarter of the limit, and
on PostgreSQL 17+ the server enforces the limit itself (`transaction_timeout`).
"""

from __future__ import annotations

import signal
import threading
import time

import psycopg
import psycopg2

from pgfresh import config as cfg
from pgfresh import db
from pgfresh import retention
from pgfresh import stages
from pgfresh.capture import pgoutput as po
from pgfresh.capture import setup
from pgfresh.capture.change import pipeline_of, worker_name
from pgfresh.capture.rowstore import RowStore, register_tables
from pgfresh.capture.stream import Stream
from pgfresh.consume import HEARTBEAT_SECONDS, BatchSize, Heartbeat
from pgfresh.errors import ConfigError, ConnectionLostError, SourceError

RECONNECT_MAX_SECONDS = 10.0  # the cap of the backoff between reconnect attempts
# SQLSTATEs of a server shutting down, crashed, or still starting up: the connection is gone, not the data.
SHUTDOWN_STATES = ("57P01", "57P02", "57P03")


def check_stage_columns(config: cfg.Config, infos: dict) -> None:
    """Templates and validators that name columns the tables lack: all reported before anything runs."""
    problems = stages.check_against_columns(config, {name: info.columns for name, info in infos.items()})
    if problems:
        raise ConfigError(problems, str(config.path))


class _Heartbeat(Heartbeat):
    """Capture's row in pgfresh.workers, with its errors and reconnects; each beat also measures, on
    the source (where only capture connects), how far capture lags and how much WAL the slot retains,
    which serve's /metrics reads from here."""

    def __init__(self, conn, name: str, pipeline: str, source=None, slot: str | None = None):
        super().__init__(conn, name, pipeline)
        self.source, self.slot = source, slot

    def beat(self, info: dict, force: bool = False, conn=None) -> None:
        if not force and time.monotonic() - self.last < HEARTBEAT_SECONDS:
            return
        if self.source is not None:
            info = {**info, **dict(zip(("lag_bytes", "retained_wal_bytes"), self.source.execute(
                "select pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::bigint, (select pg_wal_lsn_diff("
                "pg_current_wal_lsn(), restart_lsn)::bigint from pg_replication_slots where slot_name = %s)",
                (info["lsn"], self.slot)).fetchone()))}
        super().beat(info, force, conn)

    def error(self, exc: BaseException) -> None:
        try:
            self.conn.execute(
                "insert into pgfresh.workers (name, pipeline, last_error, last_error_at) values (%s, %s, %s, now())"
                " on conflict (name) do update set last_error = excluded.last_error, last_error_at = now()",
                (self.name, self.pipeline, f"{type(exc).__name__}: {exc}"[:2000]))
        except Exception:  # the database itself may be what failed; the error is re-raised anyway
            pass

    def reconnected(self, lost: "_Lost") -> None:
        """After a reconnect: the error and one more reconnect on our row; the error on the part that lost it too."""
        self.conn.execute(
            "insert into pgfresh.workers (name, pipeline, last_error, last_error_at, reconnects)"
            " values (%s, %s, %s, now(), 1) on conflict (name) do update set last_error = excluded.last_error,"
            " last_error_at = now(), reconnects = pgfresh.workers.reconnects + 1",
            (self.name, self.pipeline, str(lost)[:2000]))
        component = worker_name(lost.component, self.pipeline)
        if component != self.name:
            self.conn.execute(
                "insert into pgfresh.workers (name, pipeline, last_error, last_error_at) values (%s, %s, %s, now())"
                " on conflict (name) do update set last_error = excluded.last_error, last_error_at = now()",
                (component, self.pipeline, str(lost)[:2000]))


class _Capture:
    """The capture side's connections: checked source (reads, publication, slot), store (row store,
    heartbeat), stream."""

    def __init__(self, config: cfg.Config, dsn: str):
        src = config.source
        self.conn = db.connect(dsn, "capture", max_txn_seconds=src.max_txn_seconds, autocommit=True)
        self.stream = self.store_conn = None
        try:
            self.infos = setup.check_source(self.conn, config)  # everything checked before anything is created
            check_stage_columns(config, self.infos)
            self.warning = setup.check_wal_keep_size(self.conn, config)
            self.store_conn = db.connect_store(config, "capture", max_txn_seconds=src.max_txn_seconds,
                                               autocommit=True)
            setup.check_store(self.conn, self.store_conn, config)
            db.migrate(self.store_conn)
            pipeline = pipeline_of(config)
            register_tables(self.store_conn, pipeline, self.infos, str(config.path), source=self.conn)
            added, removed = setup.ensure_publication(self.conn, config)
            # The publication follows the config: say what changed.
            self.notes = [f"added {n} to publication {src.publication}" for n in added] + [
                f"removed {n} from publication {src.publication} (its changes are dropped)" for n in removed]
            self.store = RowStore(self.store_conn, self.infos, pipeline, source=self.conn)
            self.store.tenant_prefix = src.tenant_prefix  # [[sources]]: tenants scoped by source
            # A stored position and no usable slot: refuse (SlotLostError), never re-snapshot silently.
            slot_lsn, created = setup.ensure_slot(self.conn, config, self.store.stored_lsn())
            self.store.start(slot_lsn, created)
            self.start_lsn = self.store.stored_lsn()
            self.slot = src.slot
            self.stream = Stream(dsn, src.slot, src.publication, po.format_lsn(self.start_lsn),
                                 {i.relation or n: i.key for n, i in self.infos.items()},
                                 {i.relation or n: i.tenant for n, i in self.infos.items()})
        except BaseException:
            self.conn.close()
            if self.store_conn is not None:
                self.store_conn.close()
            raise
        self.heartbeat = _Heartbeat(self.store_conn, "capture", pipeline, source=self.conn, slot=src.slot)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()  # sends the last confirmed position
            self._await_confirmed(self.stream.confirmed)
        self.conn.close()
        self.store_conn.close()

    def _await_confirmed(self, lsn: int, seconds: float = 2.0) -> None:
        """Wait (briefly) until the slot shows the position the closed stream confirmed, so a caller
        that reads the slot after `sync --once` sees it; the walsender applies it asynchronously."""
        if not lsn:
            return
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                row = self.conn.execute(
                    "select confirmed_flush_lsn >= %s::pg_lsn or not active from pg_replication_slots"
                    " where slot_name = %s", (po.format_lsn(lsn), self.slot)).fetchone()
                if row is None or row[0]:
                    return
                time.sleep(0.01)
        except psycopg.Error:  # the source went away: the position is stored, the slot catches up next time
            return


class _Lost(Exception):
    """A connection of `component` broke (raised from `_loop` so `run` can reconnect)."""

    def __init__(self, component: str, cause: BaseException):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else "connection closed"
        super().__init__(f"{component}: {type(cause).__name__}: {first}")
        self.component, self.cause = component, cause


def connection_lost(exc: BaseException) -> bool:
    """Is `exc` the source going away (retry) rather than an error to report? By class and SQLSTATE."""
    if isinstance(exc, (_Lost, ConnectionLostError)):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        return (state is None and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))) or \
            (state is not None and (state.startswith("08") or state in SHUTDOWN_STATES))
    if isinstance(exc, psycopg2.Error):
        state = exc.pgcode
        # libpq's own errors carry no SQLSTATE: the connection or the COPY stream ended under us.
        return state is None or state.startswith("08") or state in SHUTDOWN_STATES
    return False


def run(config: cfg.Config, once: bool = False, console=None, stop: threading.Event | None = None,
        workers: list | None = None, source: str | None = None) -> dict:
    """Capture every source of the config (or only `source`) until stopped, or with once until caught up.

    One source (`[source]`, or `source` named): `run_source`, in this thread, stepping the downstream
    workers between capture batches. Several (`[[sources]]`): one capture loop per source, each in a
    thread of this process, and one thread that steps the downstream workers, each of which reads
    every source's change log (pgfresh/consume.py): a row is gated, rendered and embedded once,
    whichever source it came from, and no two threads embed the same queue. All share `stop`
    (SIGTERM stops them all); the first that fails stops the others and its error is raised once
    they have closed. Threads rather than processes: one `sync` to start, stop and supervise, and
    capture mostly waits on the network (psycopg releases the GIL). Separate processes, one per
    source, are `pgfresh sync --source NAME` (docs/SCALE.md). Returns the counts, per source under
    "sources". `workers` passed in stay open for the caller's next run.
    """
    views = [config.for_source(source)] if source else config.source_views()
    if len(views) == 1:
        return run_source(views[0], once=once, console=console, stop=stop, workers=workers)
    stop = stop or threading.Event()
    db.store_dsn(config)  # starts the embedded store (if it is one) once, before the threads look for it
    for view in views:
        setup.resolve_dsn(view)
    own_workers = workers is None
    workers = stages.workers(config) if own_workers else workers
    consumers = [w.name for w in workers]
    results: dict[str, dict] = {}
    failed: list[tuple[str, BaseException]] = []
    captured = threading.Semaphore(0)  # released once per capture thread that has finished

    def capture(view: cfg.Config) -> None:
        try:
            results[view.source.name] = run_source(view, once=once, console=console, stop=stop, workers=[],
                                                   consumers=consumers)
        except BaseException as exc:  # re-raised in the caller's thread below
            failed.append((view.source.name, exc))
            stop.set()
        finally:
            captured.release()

    def downstream() -> None:
        try:
            _downstream(config, workers, stop, captured, len(views) if once else None, console)
        except BaseException as exc:
            failed.append(("downstream", exc))
            stop.set()

    previous_handlers = _install_signals(stop)
    threads = [threading.Thread(target=capture, args=(v,), name=f"pgfresh-sync-{v.source.name}", daemon=True)
               for v in views] + [threading.Thread(target=downstream, name="pgfresh-sync-downstream", daemon=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        for w in workers if own_workers else []:
            w.close()
    if failed:
        name, exc = failed[0]
        if console is not None:
            what = "the downstream stages" if name == "downstream" else f"source {name}"
            console.print(f"{what} stopped; the sources stopped with it", highlight=False, markup=False)
        raise exc
    total = {k: sum(r[k] for r in results.values()) for k in ("changes", "transactions", "snapshot_rows", "reconnects")}
    return {**total, "sources": {v.source.name: results[v.source.name] for v in views}}


def _downstream(config: cfg.Config, workers: list, stop: threading.Event, captured: threading.Semaphore,
                sources: int | None, console) -> None:
    """Step every downstream worker until stopped; with `sources` (--once), until that many capture
    threads have finished, the workers are idle and what was captured has left the settle window.

    The store going away closes the workers; they reconnect on their next step, with capped
    backoff, for at most `source.reconnect_give_up_seconds`.
    """
    done, settle_until, delay, outage = 0, None, 0.5, None
    while True:
        try:
            busy = sum(w.step() for w in workers)
            delay, outage = 0.5, None
        except Exception as exc:
            if not connection_lost(exc):
                raise
            for w in workers:
                w.close()
            outage = outage or time.monotonic()
            if time.monotonic() - outage > config.source.reconnect_give_up_seconds:
                raise SourceError(f"lost the store connection and could not reconnect ({exc}); gave up after "
                                  f"source.reconnect_give_up_seconds = {config.source.reconnect_give_up_seconds:g}")
            if stop.wait(delay):
                break
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)
            continue
        if stop.is_set():
            break
        while sources is not None and done < sources and captured.acquire(blocking=False):
            done += 1
        if sources is not None and done == sources and not busy:
            settle_until = _settled(workers, settle_until, console)
            if settle_until is None or time.monotonic() >= settle_until:
                break
        if not busy:
            stop.wait(0.02)


def run_source(config: cfg.Config, once: bool = False, console=None, stop: threading.Event | None = None,
               workers: list | None = None, consumers: list[str] | None = None) -> dict:
    """Capture one source until stopped (or, with once, until caught up). Returns counts for the caller.

    `workers`: the downstream workers to drive (default: those the config asks for). Workers
    passed in stay open for the caller's next run (the arena keeps its embedder loaded).
    `consumers`: the change-log consumers whose positions hold back pruning (default: the workers').

    A lost connection (server restarted, network gone) closes every connection and opens them again
    with capped backoff, resuming from the stored position: the row store skips what it already
    applied, so nothing is applied twice. After `source.reconnect_give_up_seconds` of failing to
    reconnect, SourceError. Errors and reconnects are recorded in pgfresh.workers.
    """
    stop = stop or threading.Event()
    dsn = setup.resolve_dsn(config)
    cap = _Capture(config, dsn)
    if console is not None:
        for line in cap.notes + ([f"warning: {cap.warning}"] if cap.warning else []):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
    own_workers = workers is None
    workers = stages.workers(config) if own_workers else workers
    previous_handlers = _install_signals(stop)
    target = po.parse_lsn(cap.conn.execute("select pg_current_wal_lsn()::text").fetchone()[0]) if once else None
    stats = {"changes": 0, "transactions": 0, "snapshot_rows": 0, "lsn": po.format_lsn(cap.start_lsn),
             "lag_seconds": 0.0, "reconnects": 0}
    outage_started, reconnected_at = 0.0, 0.0
    try:
        while cap is not None:
            try:
                _loop(config, cap.store, cap.stream, workers, cap.heartbeat, stats, stop, target, cap.start_lsn, console,
                      [w.name for w in workers] if consumers is None else consumers)
                break
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                lost = exc if isinstance(exc, _Lost) else _Lost("capture", exc)
            cap.close()
            for w in workers:
                w.close()  # each worker opens its connection again on its next step
            # An outage lasts until a connection holds for a while: one that breaks again at once
            # (a storm of reconnects) still counts toward reconnect_give_up_seconds.
            if time.monotonic() - reconnected_at > RECONNECT_MAX_SECONDS:
                outage_started = time.monotonic()
            cap = _reconnect(config, dsn, lost, stop, console, outage_started)
            if cap is not None:
                reconnected_at = time.monotonic()
                stats["reconnects"] += 1
                cap.heartbeat.reconnected(lost)
    except BaseException as exc:
        if cap is not None:
            cap.heartbeat.error(exc)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        for w in workers if own_workers else []:
            w.close()
        if cap is not None:
            cap.close()
    return stats


def _reconnect(config: cfg.Config, dsn: str, lost: _Lost, stop: threading.Event, console,
               started: float) -> _Capture | None:
    """Open capture again, waiting 0.5 s, 1 s, 2 s ... (at most RECONNECT_MAX_SECONDS) between tries.

    Returns None when stopped meanwhile; SourceError after source.reconnect_give_up_seconds.
    """
    give_up = config.source.reconnect_give_up_seconds
    delay, last = 0.5, lost
    if console is not None:
        console.print(f"connection lost ({lost}); reconnecting", highlight=False, soft_wrap=True)
    while not stop.wait(delay):
        elapsed = time.monotonic() - started
        if elapsed >= give_up:
            first = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
            raise SourceError(
                f"lost the source connection {elapsed:.0f} s ago and could not reconnect ({first}); gave up after "
                f"source.reconnect_give_up_seconds = {give_up:g}: start pgfresh sync again once the server is back "
                "(it resumes from the stored position)")
        try:
            return _Capture(config, dsn)
        except Exception as exc:
            if not connection_lost(exc):
                raise
            last = exc
        delay = min(delay * 2, RECONNECT_MAX_SECONDS, max(0.1, give_up - (time.monotonic() - started)))
    return None


def _loop(config, store, stream, workers, heartbeat, stats, stop, target, processed, console, consumers) -> None:
    src = config.source
    chunk = BatchSize(src.snapshot_chunk_rows, src.max_txn_seconds, smallest=100)
    batch, batch_changes, batch_started = [], 0, 0.0
    last_prune = time.monotonic()
    keep = retention.settings(config)
    # `consumers`: a consumer the config no longer runs holds nothing back
    settle_until = None  # --once: caught up, waiting for the settle window of rows captured before
    names = {i.relation: n for n, i in store.infos.items() if i.relation}  # [[sources]]: stored names
    while True:
        txs = stream.poll(timeout=0.02 if (batch or store.snapshot_pending) else 0.25)
        if txs and (names or store.tenant_prefix):
            _to_store(txs, names, store.tenant_prefix)
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
            rows, seconds = store.snapshot_step(chunk.size)
            stats["snapshot_rows"] += rows
            chunk.took(seconds)  # every chunk transaction well inside max_txn_seconds, whatever the row width
        busy = 0
        for w in workers:
            try:
                busy += w.step()
            except Exception as exc:
                if connection_lost(exc):
                    raise _Lost(w.name, exc) from exc
                raise
        stats["lsn"] = po.format_lsn(processed)
        heartbeat.beat({"lsn": stats["lsn"], "changes": stats["changes"], "lag_seconds": stats["lag_seconds"],
                        "snapshot_pending": store.snapshot_pending})
        if time.monotonic() - last_prune > keep.prune_interval_seconds:
            retention.prune(store.conn, config, consumers, store.pipeline)
            last_prune = time.monotonic()
        if stop.is_set() and not batch:
            break
        if target is not None and not batch and not store.snapshot_pending:
            if processed >= target and not txs and not busy:
                settle_until = _settled(workers, settle_until, console)
                if settle_until is None or time.monotonic() >= settle_until:
                    break
            if not txs:
                stream.request_position()
    heartbeat.beat({"lsn": stats["lsn"], "changes": stats["changes"], "lag_seconds": stats["lag_seconds"],
                    "snapshot_pending": []}, force=True)
    retention.prune(store.conn, config, consumers, store.pipeline)


def _to_store(txs, names: dict[str, str], tenant_prefix: str) -> None:
    """[[sources]]: each change's table and tenant as the store keeps them (`billing:public.invoices`,
    `billing:acme`). A table the source does not capture keeps its name (the row store drops it)."""
    for tx in txs:
        for c in tx.changes:
            c.table = names.get(c.table, c.table)
            if c.tenant is not None:
                c.tenant = tenant_prefix + c.tenant


def _settled(workers, until: float | None, console) -> float | None:
    """`--once` is caught up: until when to keep stepping so rows captured before now leave the settle window.

    The bound is fixed the first time (now + the longest wait then), so rows that a busy source keeps
    parking later cannot hold `--once` open; they enter on the next run. None: nothing waits on time.
    """
    if until is not None:
        return until
    waits = [s for s in (w.settling_seconds() for w in workers) if s is not None]
    if not waits:
        return None
    if console is not None:
        console.print(f"caught up; waiting {max(waits):.1f} s for rows in the gate's settle window", highlight=False)
    return time.monotonic() + max(waits) + 0.5


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

