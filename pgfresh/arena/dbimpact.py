"""What pgfresh does to the source database during a run, measured on the server itself.

- `XminSampler`: once a second, the oldest snapshot (age of `backend_xmin`) and the longest open
  transaction held by pgfresh's own backends (`application_name` `pgfresh-*`; the arena's
  workload, sampler and exports, named `pgfresh-arena-*`, are not pgfresh and are left out),
  and the WAL the replication slot retains.
- `table_stats`: dead tuples and size of a table, by `pgstattuple` (exact; the extension ships
  with the embedded server) or, where it cannot be created, the statistics collector's estimate.
- `oltp_throughput`: transactions per second of a pgbench load (the `pgbench` binary shipped with
  the embedded server, a custom script of one UPDATE and one SELECT on `arena.oltp`); a Python
  loop of the same transaction where no pgbench binary exists. The runner measures it with and
  without pgfresh working. On a machine with 4 or more cores (`core_split`), the source server
  and pgbench run on half of them and pgfresh (this process and a local store server) on the
  others while it measures, so "with pgfresh" measures what pgfresh does to the database, not to
  the CPU it shares; on fewer cores nothing is pinned and the result says the source had no core
  to itself (`cores`).
- `wal_window` / `wal_share`: WAL the source server wrote (`pg_current_wal_lsn` deltas) while a
  workload ran, from a CHECKPOINT on so that every window pays the same full-page images, per
  workload change; the runner measures one window of the live workload without pgfresh and one
  with pgfresh capturing, and `wal_share` is what pgfresh added (goal: under 1%). pgfresh writes
  nothing to the source, so what it adds is the WAL its reads cause (hint bits under checksums)
  and what the server logs for an active slot.
- `ledger_wal`: the WAL bench and test workload (bench/source_wal.py, tests/test_store.py): a
  captured ledger table, the same inserts and updates once without pgfresh and once with `pgfresh
  sync` streaming them, after a warm-up window from a CHECKPOINT.
- `export_comparison`: the naive training export (read a table inside ONE long REPEATABLE READ
  transaction while the workload updates it) against the pgfresh way (the same reads in short
  transactions, one per chunk), each followed by VACUUM at the end of the read: the dead tuples
  VACUUM could not remove, the table's growth and the xmin age the reader held.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from psycopg import errors as pgerr
from psycopg import sql

from pgfresh import db
from pgfresh.errors import PgfreshError

PGFRESH_BACKENDS = ("select coalesce(max(age(backend_xmin)), 0), coalesce(max(extract(epoch from clock_timestamp()"
                    " - xact_start)), 0), count(*) from pg_stat_activity where application_name like 'pgfresh-%%'"
                    " and application_name not like 'pgfresh-arena%%' and pid <> pg_backend_pid()"
                    " and datname = current_database()")
OLTP_SCRIPT = "\\set aid random(1, 1000)\nupdate arena.oltp set balance = balance + 1 where id = :aid;\n" \
              "select balance from arena.oltp where id = :aid;\n"


def ensure_pgstattuple(conn) -> bool:
    """Create the pgstattuple extension if possible; False when the server lacks it or we may not."""
    try:
        conn.execute("create extension if not exists pgstattuple")
        return True
    except (pgerr.UndefinedFile, pgerr.FeatureNotSupported, pgerr.InsufficientPrivilege):
        conn.rollback()
        return False


def table_stats(conn, table: str, exact: bool = True) -> dict:
    """Live and dead tuples and size of `table` (schema.table); `method` says how they were counted."""
    regclass = sql.Literal(table)
    if exact:
        row = conn.execute(sql.SQL("select tuple_count, dead_tuple_count, table_len, dead_tuple_percent,"
                                   " pg_total_relation_size({}::regclass) from pgstattuple({}::regclass)").format(
            regclass, regclass)).fetchone()
        method = "pgstattuple"
    else:
        row = conn.execute(sql.SQL("select n_live_tup, n_dead_tup, pg_relation_size({0}::regclass), null,"
                                   " pg_total_relation_size({0}::regclass) from pg_stat_user_tables"
                                   " where relid = {0}::regclass").format(regclass)).fetchone()
        method = "pg_stat_user_tables (estimate)"
    return {"table": table, "method": method, "live_tuples": int(row[0]), "dead_tuples": int(row[1]),
            "table_bytes": int(row[2]), "dead_percent": None if row[3] is None else float(row[3]),
            "total_bytes": int(row[4])}


def write_counts(conn) -> dict[str, int]:
    """Rows inserted + updated + deleted so far per user table (schemas arena and pgfresh excluded)."""
    return {f"{s}.{t}": int(n) for s, t, n in conn.execute(
        "select schemaname, relname, n_tup_ins + n_tup_upd + n_tup_del from pg_stat_user_tables"
        " where schemaname not in ('arena', 'pgfresh')")}


def busiest(before: dict[str, int], after: dict[str, int]) -> str | None:
    deltas = {t: n - before.get(t, 0) for t, n in after.items()}
    return max(deltas, key=lambda t: (deltas[t], t)) if deltas and max(deltas.values()) > 0 else None


class XminSampler(threading.Thread):
    """Samples pgfresh's hold on the source once per `interval_s` until `stop()`."""

    def __init__(self, dsn: str, interval_s: float = 1.0, t0: float | None = None):
        super().__init__(name="arena-xmin-sampler", daemon=True)
        self.dsn, self.interval_s = dsn, interval_s
        self.t0 = t0 or time.monotonic()
        self.samples: list[dict] = []
        self.error: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            with db.connect(self.dsn, "arena-sampler", autocommit=True) as conn:
                while not self._stop_event.is_set():
                    self.samples.append(self.sample(conn))
                    self._stop_event.wait(self.interval_s)
        except Exception as exc:  # surfaced in the results; the run itself goes on
            self.error = f"{type(exc).__name__}: {exc}"

    def sample(self, conn) -> dict:
        xmin_age, longest, backends = conn.execute(PGFRESH_BACKENDS).fetchone()
        (retained,) = conn.execute(
            "select coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), 0) from pg_replication_slots"
            " where database = current_database()").fetchone()
        return {"t_s": round(time.monotonic() - self.t0, 3), "xmin_age": int(xmin_age),
                "longest_xact_s": round(float(longest), 3), "backends": int(backends),
                "slot_retained_bytes": int(retained)}

    def stop(self) -> dict:
        self._stop_event.set()
        self.join(timeout=10)
        s = self.samples
        return {"samples": s, "error": self.error,
                "max_xmin_age": max((x["xmin_age"] for x in s), default=None),
                "max_xact_s": max((x["longest_xact_s"] for x in s), default=None),
                "max_slot_retained_bytes": max((x["slot_retained_bytes"] for x in s), default=None)}


def pgbench_path() -> Path | None:
    try:
        from pgfresh.embedded import _bin_dir  # the server's own client programs, same version

        path = _bin_dir() / "pgbench"
        if path.exists():
            return path
    except Exception:  # no embedded wheel: fall back to PATH
        pass
    found = shutil.which("pgbench")
    return Path(found) if found else None


def core_split(cores: list[int] | None = None) -> dict:
    """Which cores the OLTP measurement gives the source server and pgbench, and which pgfresh: half
    each (the source the lower half) with 4 or more usable cores; none pinned with fewer."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if len(cores) < 4:
        return {"machine_cores": len(cores), "pinned": False, "source_cores": [], "pgfresh_cores": [],
                "note": f"{len(cores)} cores, not pinned: the source server and pgbench shared them with pgfresh "
                        "and its store, so the source had no core to itself and pgfresh's CPU competes with "
                        "the database"}
    half = len(cores) // 2
    return {"machine_cores": len(cores), "pinned": True, "source_cores": cores[:half], "pgfresh_cores": cores[half:],
            "note": f"the source server and pgbench on {half} cores of their own ({_ranges(cores[:half])}), "
                    f"pgfresh and its store on the other {len(cores) - half} ({_ranges(cores[half:])})"}


def _ranges(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


def server_pids(dsn: str) -> list[int]:
    """The processes of the server `dsn` reaches, where it runs on this machine (the postmaster and
    its children); [] for a server elsewhere. Found from our own backend's parent, never by name."""
    with db.connect(dsn, "arena-pin", autocommit=True) as conn:
        pid, addr = conn.execute("select pg_backend_pid(), inet_server_addr()::text").fetchone()
        if addr is not None and not addr.startswith(("127.", "::1")):
            return []
        try:  # while our backend lives: once the connection closes it exits, and /proc forgets it
            postmaster = _ppid(pid)
            if not Path(f"/proc/{postmaster}/comm").read_text().startswith("postgres"):
                return []
        except (OSError, ValueError):
            return []
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _ppid(int(entry.name)) == postmaster:
                    children.append(int(entry.name))
            except (OSError, ValueError):  # gone meanwhile
                continue
    return [postmaster, *children]


def _ppid(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ')'
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _set_affinity(pids: list[int], cores) -> None:
    for pid in pids:
        try:
            os.sched_setaffinity(pid, cores)
        except (ProcessLookupError, PermissionError):  # a backend that exited; one we may not move
            continue


@contextlib.contextmanager
def pinned(split: dict, dsn: str, store_dsn: str | None = None):
    """While inside: the source server's processes on `source_cores`, this process's threads (pgfresh's
    capture, index and strategies) and a local store server on `pgfresh_cores`; all restored after.
    Yields what was pinned. Threads and processes started inside keep the affinity they inherited."""
    if not split["pinned"]:
        yield {}
        return
    everything = os.sched_getaffinity(0)
    source = server_pids(dsn)
    store = [p for p in (server_pids(store_dsn) if store_dsn else []) if p not in source]
    own = [int(t) for t in os.listdir("/proc/self/task")]
    _set_affinity(source, split["source_cores"])
    _set_affinity(store + own, split["pgfresh_cores"])
    try:
        yield {"source_processes": len(source), "store_processes": len(store), "pgfresh_threads": len(own)}
    finally:
        _set_affinity(source + server_pids(dsn) + store + [int(t) for t in os.listdir("/proc/self/task")], everything)


def oltp_throughput(dsn: str, seconds: float, clients: int = 2, store_dsn: str | None = None) -> dict:
    """TPS of the OLTP load on arena.oltp for `seconds` (pgbench, else a Python loop), with the
    source server and pgbench pinned apart from pgfresh where the machine has the cores (`cores`)."""
    split = core_split()
    with pinned(split, dsn, store_dsn) as moved:
        out = _oltp(dsn, seconds, clients, split["source_cores"] if split["pinned"] else None)
    return {**out, "cores": {**split, **moved}}


def _oltp(dsn: str, seconds: float, clients: int, cores) -> dict:
    exe = pgbench_path()
    if exe is None:
        return _python_oltp(dsn, seconds, clients)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(OLTP_SCRIPT)
    try:
        proc = subprocess.run([str(exe), "-n", "-T", str(max(1, round(seconds))), "-c", str(clients), "-j", "1",
                               "-f", f.name, dsn], capture_output=True, text=True, timeout=seconds + 60,
                              preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))
    finally:
        Path(f.name).unlink(missing_ok=True)
    m = re.search(r"tps = ([0-9.]+)", proc.stdout)
    done = re.search(r"number of transactions actually processed: (\d+)", proc.stdout)
    if proc.returncode != 0 or not m:
        return {"tool": "pgbench", "tps": None, "error": (proc.stderr or proc.stdout).strip()[-300:]}
    return {"tool": "pgbench", "tps": float(m.group(1)), "seconds": max(1, round(seconds)), "clients": clients,
            "transactions": int(done.group(1)) if done else None}


def _python_oltp(dsn: str, seconds: float, clients: int) -> dict:
    counts = [0] * clients
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        import random

        rng = random.Random(i)
        with db.connect(dsn, "arena-oltp", autocommit=True) as conn:
            while time.monotonic() < deadline:
                aid = rng.randint(1, 1000)
                with conn.transaction():
                    conn.execute("update arena.oltp set balance = balance + 1 where id = %s", (aid,))
                    conn.execute("select balance from arena.oltp where id = %s", (aid,)).fetchone()
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tool": "python", "tps": sum(counts) / seconds, "seconds": seconds, "clients": clients,
            "transactions": sum(counts)}


WAL_GOAL_SHARE = 0.01  # pgfresh adds under 1% to the WAL the source writes


def wal_position(conn) -> int:
    """The source server's current WAL write position, in bytes."""
    (n,) = conn.execute("select pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(n)


def wal_window(dsn: str, workload: Callable[[], int], settle: Callable[[], None] | None = None,
               checkpoint: bool = True) -> dict:
    """WAL the source server wrote while `workload()` ran (it returns how many changes it made).

    With `checkpoint` the window starts with a CHECKPOINT (where the role may run one), so windows of
    a random workload pay the same full-page images in expectation; without, a window right after
    another pays none for the pages the first already touched (an exact comparison of two runs of
    the same statements). `settle()` runs before the window closes (e.g. wait until pgfresh has
    captured everything). Server-wide: run nothing else meanwhile.
    """
    with db.connect(dsn, "arena-wal", autocommit=True) as conn:
        try:
            if checkpoint:
                conn.execute("checkpoint")
        except pgerr.InsufficientPrivilege:  # pg_checkpoint (16+) or superuser; the window is noisier without
            checkpoint = False
        start = wal_position(conn)
        changes = workload()
        if settle is not None:
            settle()
        written = wal_position(conn) - start
    return {"wal_bytes": written, "changes": changes, "checkpoint": checkpoint,
            "bytes_per_change": round(written / changes, 3) if changes else None}


def same_server(dsn: str, other_dsn: str) -> bool:
    """Do both DSNs reach one server (one WAL)? Then the store's writes would count as the source's."""
    ids = []
    for d in (dsn, other_dsn):
        with db.connect(d, "arena-wal", autocommit=True) as conn:
            ids.append(conn.execute("select system_identifier, inet_server_port() from pg_control_system()").fetchone())
    return ids[0] == ids[1]


def wal_share(without: dict, with_: dict) -> float | None:
    """What pgfresh added to the source's WAL: bytes per change with it over without, minus one."""
    a, b = without.get("bytes_per_change"), with_.get("bytes_per_change")
    return None if not a or b is None else round(b / a - 1, 5)


LEDGER_SQL = ("create table ledger (id bigint primary key, account int not null, amount int not null, note text)"
              " with (autovacuum_enabled = off)")  # a vacuum (or analyze) would write WAL in one window only


def ledger_wal(config, dsn: str, store_dsn: str, inserts: int, timeout_s: float = 120) -> dict:
    """WAL the source writes for the ledger workload without pgfresh, then with `pgfresh sync`
    streaming it (started before the window: the live phase, not the set-up).

    The table exists (`LEDGER_SQL`) and `config` captures it into the store at `store_dsn`. Each
    window: `inserts` inserts of one row, every fourth followed by an update of the row before, one
    transaction each. A warm-up window from a CHECKPOINT first, then the two without one, so neither
    pays a full-page image the other does not. The source should be a server of its own: WAL is
    server-wide. Returns both windows and `wal_share`.
    """
    from pgfresh.capture import sync  # the arena drives capture; capture never imports the arena

    sync.run(config, once=True)  # publication, slot and snapshot: the set-up
    ids, last = itertools.count(1), []

    def workload() -> int:
        n = 0
        with db.connect(dsn, "arena-workload", autocommit=True) as w:
            for _ in range(inserts):
                i = next(ids)
                w.execute("insert into ledger values (%s, %s, %s, 'payment received')", (i, i % 97, i % 1000))
                n += 1
                if i % 4 == 0:
                    w.execute("update ledger set amount = amount + 1 where id = %s", (i - 1,))
                    n += 1
        last.append(i)
        return n

    def wait(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise PgfreshError(f"ledger_wal: {what} within {timeout_s:g} s")
            time.sleep(0.1)

    with db.connect(store_dsn, "arena-wal", autocommit=True) as store, \
            db.connect(dsn, "arena-wal", autocommit=True) as source:
        def captured() -> None:  # the window closes once pgfresh has stored the workload's last row
            wait("pgfresh did not capture the window's changes", lambda: store.execute(
                "select exists (select 1 from pgfresh.rows where key = %s)", (f"[{last[-1]}]",)).fetchone()[0])

        wal_window(dsn, workload)  # from a checkpoint: both windows below then start on touched pages
        without = wal_window(dsn, workload, checkpoint=False)
        stop = threading.Event()
        capture = threading.Thread(target=sync.run, args=(config,), kwargs={"stop": stop}, name="ledger-sync")
        capture.start()
        try:
            wait("sync did not start streaming", lambda: not capture.is_alive() or source.execute(
                "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = %s",
                (config.source.slot,)).fetchone()[0])
            if not capture.is_alive():
                raise PgfreshError("ledger_wal: sync stopped before streaming")
            with_ = wal_window(dsn, workload, captured, checkpoint=False)
        finally:
            stop.set()
            capture.join()
    return {"without_pgfresh": without, "with_pgfresh": with_, "added_share": wal_share(without, with_)}


def _key_columns(conn, table: str) -> list[str]:
    from pgfresh.arena.workload import primary_key

    return primary_key(conn, table)


def _export(dsn: str, table: str, chunks: int, between: Callable[[], None], long: bool, exact: bool) -> dict:
    mode = "naive" if long else "chunked"
    with db.connect(dsn, "arena-vacuum", autocommit=True) as admin, \
            db.connect(dsn, f"arena-export-{mode}", autocommit=True) as reader:
        ident = sql.Identifier(*table.split(".", 1))
        admin.execute(sql.SQL("vacuum {}").format(ident))
        before = table_stats(admin, table, exact)
        key = _key_columns(admin, table)
        cols = sql.SQL(", ").join(map(sql.Identifier, key))
        per_chunk = max(1, before["live_tuples"] // chunks + 1)
        started, rows, last = time.monotonic(), 0, None
        if long:
            reader.execute("begin isolation level repeatable read")
        for _ in range(chunks):
            after_key = sql.SQL("where ({}) > ({})").format(cols, sql.SQL(", ").join(sql.Placeholder() * len(key))) \
                if last else sql.SQL("")
            # The key columns first, so the next chunk starts after the last key read.
            query = sql.SQL("select {}, * from {} {} order by {} limit %s").format(cols, ident, after_key, cols)
            with (contextlib.nullcontext() if long else reader.transaction()):
                got = reader.execute(query, [*(last or []), per_chunk]).fetchall()
            rows += len(got)
            if got:
                last = list(got[-1][: len(key)])
            between()
        (pid,) = reader.execute("select pg_backend_pid()").fetchone()
        (xmin_age,) = admin.execute("select coalesce(age(backend_xmin), 0) from pg_stat_activity where pid = %s",
                                    (pid,)).fetchone()
        admin.execute(sql.SQL("vacuum {}").format(ident))
        after = table_stats(admin, table, exact)
        if long:
            reader.execute("commit")
        return {"mode": mode, "rows_read": rows, "chunks": chunks, "seconds": round(time.monotonic() - started, 3),
                "reader_xmin_age_at_vacuum": int(xmin_age), "dead_tuples_after_vacuum": after["dead_tuples"],
                "table_bytes_before": before["table_bytes"], "table_bytes_after": after["table_bytes"],
                "table_growth_bytes": after["table_bytes"] - before["table_bytes"], "method": after["method"]}


def export_comparison(dsn: str, table: str, between: Callable[[], None], chunks: int = 10) -> dict:
    """Naive (one long transaction) vs chunked (short transactions) export of `table`.

    `between()` is called after each chunk: the caller makes the workload change the table then
    (the runner waits while the live workload runs; the test makes a fixed number of updates).
    """
    with db.connect(dsn, "arena-vacuum", autocommit=True) as conn:
        exact = ensure_pgstattuple(conn)
    naive = _export(dsn, table, chunks, between, long=True, exact=exact)
    chunked = _export(dsn, table, chunks, between, long=False, exact=exact)
    return {"table": table, "naive": naive, "chunked": chunked}
