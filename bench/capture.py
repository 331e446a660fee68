"""Capture throughput, each figure against a baseline read in the same run (issue 12's goals).

Figures printed:
- raw stream: pgoutput messages/s read from a slot with psycopg2 and not decoded (the ceiling);
- pgfresh end to end: changes/s from the same WAL into the row store + change log (decode,
  reconcile, COPY, upsert, LSN stored, slot confirmed; `sync --once` from start to exit, connection
  setup included), and its ratio to the raw rate (goal: >= 0.25 x);
- snapshot: rows/s of pgfresh's chunked snapshot (`sync --once` on a new slot) against one
  `COPY table TO STDOUT` of the same table (goal: >= 0.5 x), and the longest transaction any
  pgfresh connection held meanwhile (sampled from pg_stat_activity every 20 ms), against
  `max_txn_seconds`.

The store is a second embedded server (pgfresh's default layout; `--store same` puts schema
pgfresh in the source database instead). Both servers live in a temporary directory removed at
the end. `--profile DIR` writes cProfile files of the two pgfresh runs.

Run: PYTHONPATH=. python bench/capture.py [--rows 200000] [--changes 200000] [--store separate|same]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import select
import shutil
import tempfile
import threading
import time

import psycopg
import psycopg2
import psycopg2.extras

from pgfresh import config as cfg
from pgfresh.capture import sync
from pgfresh.capture.pgoutput import parse_lsn
from pgfresh.embedded import EmbeddedServer

MAX_TXN_SECONDS = 5.0
_TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(server: EmbeddedServer) -> float:
    """CPU seconds a server has used: the postmaster, its live children, and its exited children
    (which the postmaster has waited for)."""
    postmaster = int(open(os.path.join(server.pgdata, "postmaster.pid")).readline())
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == postmaster:
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


class CpuMeter:
    """CPU seconds of this process and of the given servers over a `with` block."""

    def __init__(self, *servers: EmbeddedServer):
        self.servers = list(dict.fromkeys(servers))

    def _now(self) -> float:
        return time.process_time() + sum(server_cpu(s) for s in self.servers)

    def __enter__(self):
        self.start = self._now()
        return self

    def __exit__(self, *exc):
        self.seconds = self._now() - self.start


def raw_stream_rate(dsn: str, slot: str, publication: str, until_lsn: str) -> tuple[int, float]:
    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = conn.cursor()
    cur.start_replication(slot_name=slot, decode=False, options={"proto_version": "2", "publication_names": publication})
    target = parse_lsn(until_lsn)
    n, started = 0, time.perf_counter()
    while True:
        msg = cur.read_message()
        if msg is None:
            select.select([conn], [], [], 0.05)
            continue
        n += 1
        if msg.data_start >= target and msg.payload[:1] == b"C":
            break
    elapsed = time.perf_counter() - started
    conn.close()
    return n, elapsed


class LongestTransaction:
    """Samples pg_stat_activity on the given servers: the longest open pgfresh transaction seen."""

    def __init__(self, dsns: list[str], interval: float = 0.02):
        self.dsns, self.interval, self.worst, self.samples = dsns, interval, 0.0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conns = [psycopg.connect(d, autocommit=True) for d in self.dsns]
        try:
            while not self.stop.is_set():
                for c in conns:
                    (age,) = c.execute("select coalesce(max(extract(epoch from clock_timestamp() - xact_start)), 0)"
                                       " from pg_stat_activity where application_name like 'pgfresh-%'"
                                       " and xact_start is not null").fetchone()
                    self.worst = max(self.worst, float(age))
                self.samples += 1
                time.sleep(self.interval)
        finally:
            for c in conns:
                c.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def timed_sync(conf: cfg.Config, profile_path: str | None) -> tuple[dict, float]:
    prof = cProfile.Profile() if profile_path else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    stats = sync.run(conf, once=True)
    if prof:
        prof.disable()
        prof.dump_stats(profile_path)
    return stats, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="rows in the snapshot table")
    ap.add_argument("--changes", type=int, default=200_000, help="streamed changes (updates in 1,000-row transactions)")
    ap.add_argument("--store", choices=("separate", "same"), default="separate",
                    help="separate: schema pgfresh on a second embedded server (the default layout)")
    ap.add_argument("--profile", metavar="DIR", help="write cProfile files snapshot.prof and stream.prof here")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pgfresh-bench-")
    server = EmbeddedServer(os.path.join(work, "pg"))
    store_server = EmbeddedServer(os.path.join(work, "store")) if args.store == "separate" else None
    load_before = os.getloadavg()
    dsn = server.start()
    store_dsn = store_server.start() if store_server else dsn
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    prof = (lambda name: os.path.join(args.profile, name)) if args.profile else (lambda name: None)

    def conf(slot: str, table: str) -> cfg.Config:
        return cfg.parse({"source": {"dsn": dsn, "slot": slot, "publication": slot.replace("slot", "pub"),
                                     "data_dir": os.path.join(work, "data"), "max_txn_seconds": MAX_TXN_SECONDS},
                          "store": {"dsn": store_dsn}, "tables": [{"name": table}]})

    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("create table snap (id int primary key, name text, price numeric(10,2), note text)")
            c.execute("insert into snap select g, 'item ' || g, g %% 1000 + 0.99, repeat('n', 60) from generate_series(1, %s) g",
                      (args.rows,))
            c.execute("create table hot (id int primary key, v int, price numeric(10,2), name text)")
            c.execute("insert into hot select g, 0, 1.00, 'hot ' || g from generate_series(1, 10000) g")
            c.execute("vacuum analyze")
            c.execute("create publication rawpub for table hot")

        # Snapshot: pgfresh's chunked read vs one COPY of the same table, one right after the other.
        with psycopg.connect(dsn) as c, CpuMeter(server) as copy_cpu:
            t0 = time.perf_counter()
            with c.cursor().copy("copy snap to stdout") as cp:
                copied = sum(1 for _ in cp.rows())
            copy_s = time.perf_counter() - t0
        with LongestTransaction(list(dict.fromkeys([dsn, store_dsn]))) as longest:
            with CpuMeter(server, store_server or server) as snap_cpu:
                stats, snap_s = timed_sync(conf("snapslot", "snap"), prof("snapshot.prof"))

        # Stream: one raw slot and pgfresh's slot see the same WAL.
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("select pg_create_logical_replication_slot('rawslot', 'pgoutput')")
        hot_conf = conf("hotslot", "hot")
        sync.run(hot_conf, once=True)  # creates the slot and reads the 10k-row table
        with psycopg.connect(dsn, autocommit=True) as c:
            for start in range(0, args.changes, 1000):
                lo = start % 10000
                c.execute("update hot set v = v + 1, price = price + 0.01 where id > %s and id <= %s", (lo, lo + 1000))
            end_lsn = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        with CpuMeter(server) as raw_cpu:
            n_raw, raw_s = raw_stream_rate(dsn, "rawslot", "rawpub", end_lsn)
        with CpuMeter(server, store_server or server) as e2e_cpu:
            stream_stats, e2e_s = timed_sync(hot_conf, prof("stream.prof"))
    finally:
        if store_server:
            store_server.destroy()
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)

    raw_rate = n_raw / raw_s
    e2e_rate = stream_stats["changes"] / e2e_s
    load_after = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"store: {args.store}")
    # CPU: this process plus the servers involved (source; store for pgfresh), in microseconds per
    # row; less sensitive than wall time to what else the machine runs.
    us = lambda meter, n: meter.seconds / max(n, 1) * 1e6
    print(f"raw pgoutput stream:   {n_raw:>9,} messages in {raw_s:6.2f} s = {raw_rate:>10,.0f} messages/s (no decoding); "
          f"CPU {us(raw_cpu, n_raw):.1f} us/message")
    print(f"pgfresh end to end:    {stream_stats['changes']:>9,} changes  in {e2e_s:6.2f} s = {e2e_rate:>10,.0f} changes/s "
          f"into the row store ({e2e_rate / raw_rate:.2f} x raw); CPU {us(e2e_cpu, stream_stats['changes']):.1f} us/change")
    print(f"COPY TO STDOUT:        {copied:>9,} rows     in {copy_s:6.2f} s = {copied / copy_s:>10,.0f} rows/s; "
          f"CPU {us(copy_cpu, copied):.1f} us/row")
    print(f"pgfresh snapshot:      {stats['snapshot_rows']:>9,} rows     in {snap_s:6.2f} s = "
          f"{stats['snapshot_rows'] / snap_s:>10,.0f} rows/s ({copy_s / snap_s:.2f} x COPY); "
          f"CPU {us(snap_cpu, stats['snapshot_rows']):.1f} us/row; longest pgfresh "
          f"transaction {longest.worst:.2f} s (max_txn_seconds {MAX_TXN_SECONDS:g}, {longest.samples} samples)")


if __name__ == "__main__":
    main()
