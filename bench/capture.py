"""Capture throughput on one embedded server, in one run (issue 2's benchmark).

Figures printed:
- raw stream: pgoutput messages/s read from a slot with psycopg2 and not decoded (the ceiling);
- pgfresh end to end: changes/s from the same WAL into the row store + change log (decode,
  reconcile, COPY, upsert, LSN stored, slot confirmed), and its ratio to the raw rate;
- snapshot: rows/s of pgfresh's chunked snapshot against one `COPY table TO STDOUT`, and against
  the store's floor: the same rows read with one COPY, formatted as pgfresh stores them (key,
  JSON row) and COPied straight into two tables shaped like `pgfresh.rows` and `pgfresh.changes`
  (their indexes; no chunks, no conflict check, no snapshot bookkeeping): what writing every row
  twice costs on this server, whatever pgfresh does around it.

Run: .venv/bin/python bench/capture.py [--rows 200000] [--changes 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import psycopg
from psycopg.conninfo import make_conninfo
import psycopg2
import psycopg2.extras

from pgfresh import config as cfg
from pgfresh.capture import sync
from pgfresh.embedded import EmbeddedServer


def raw_stream_rate(dsn: str, slot: str, publication: str, until_lsn: str) -> tuple[int, float]:
    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = conn.cursor()
    cur.start_replication(slot_name=slot, decode=False, options={"proto_version": "2", "publication_names": publication})
    target = int(until_lsn.split("/")[0], 16) << 32 | int(until_lsn.split("/")[1], 16)
    n, started = 0, time.perf_counter()
    while True:
        msg = cur.read_message()
        if msg is None:
            import select
            select.select([conn], [], [], 0.05)
            continue
        n += 1
        if msg.data_start >= target and msg.payload[:1] == b"C":
            break
    elapsed = time.perf_counter() - started
    conn.close()
    return n, elapsed


def store_floor(source_dsn: str, store_dsn: str) -> float:
    """Seconds to read `snap` with one COPY and write each row into a row-store and a change-log table."""
    with psycopg.connect(store_dsn, autocommit=True) as st:
        st.execute("create table floor_rows (like pgfresh.rows including all)")
        st.execute("create table floor_changes (like pgfresh.changes including all)")
    t0 = time.perf_counter()
    with psycopg.connect(source_dsn) as src, psycopg.connect(store_dsn) as st:
        cols = ["id", "name", "price", "note"]
        with src.cursor().copy("copy snap (id, name, price, note) to stdout") as cp:
            rows = [(f"[{r[0]}]", json.dumps(dict(zip(cols, r)))) for r in cp.rows()]
        with st.cursor() as cur:
            with cur.copy("copy floor_rows (tbl, key, row, lsn, versions) from stdin") as cp:
                for key, row in rows:
                    cp.write_row(("public.snap", key, row, "0/0", 1))
            with cur.copy("copy floor_changes (tbl, key, op, row, lsn) from stdin") as cp:
                for key, row in rows:
                    cp.write_row(("public.snap", key, "read", row, "0/0"))
        st.commit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="rows in the snapshot table")
    ap.add_argument("--changes", type=int, default=200_000, help="streamed changes (updates in 1,000-row transactions)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pgfresh-bench-")
    server = EmbeddedServer(os.path.join(work, "pg"))
    dsn = server.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("create table snap (id int primary key, name text, price numeric(10,2), note text)")
            c.execute("insert into snap select g, 'item ' || g, g %% 1000 + 0.99, repeat('n', 60) from generate_series(1, %s) g",
                      (args.rows,))
            c.execute("create table hot (id int primary key, v int, price numeric(10,2), name text)")
            c.execute("insert into hot select g, 0, 1.00, 'hot ' || g from generate_series(1, 10000) g")
            c.execute("vacuum analyze")
            c.execute("create publication rawpub for table hot")

        # Snapshot: pgfresh's chunked read vs one COPY of the same table.
        with psycopg.connect(dsn) as c:
            t0 = time.perf_counter()
            with c.cursor().copy("copy snap to stdout") as cp:
                copied = sum(1 for _ in cp.rows())
            copy_s = time.perf_counter() - t0
        # The store is a database of its own on the same server (by default it is a server of its own),
        # so the slot's walsender does not decode pgfresh's own writes; nothing is left in the working
        # directory, so every run starts from an empty store.
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("create database bench_store")
        store = {"dsn": make_conninfo(dsn, dbname="bench_store")}
        data_dir = os.path.join(work, "data")
        snap_conf = cfg.parse({"source": {"dsn": dsn, "slot": "snapslot", "publication": "snappub",
                                          "data_dir": data_dir}, "store": store, "tables": [{"name": "snap"}]})
        t0 = time.perf_counter()
        stats = sync.run(snap_conf, once=True)
        snap_s = time.perf_counter() - t0
        floor_s = store_floor(dsn, store["dsn"])

        # Stream: one raw slot and pgfresh's slot see the same WAL.
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("select pg_create_logical_replication_slot('rawslot', 'pgoutput')")
        hot_conf = cfg.parse({"source": {"dsn": dsn, "slot": "hotslot", "publication": "hotpub",
                                         "data_dir": data_dir}, "store": store, "tables": [{"name": "hot"}]})
        sync.run(hot_conf, once=True)  # creates the slot and reads the 10k-row table
        with psycopg.connect(dsn, autocommit=True) as c:
            for start in range(0, args.changes, 1000):
                lo = start % 10000
                c.execute("update hot set v = v + 1, price = price + 0.01 where id > %s and id <= %s", (lo, lo + 1000))
            end_lsn = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        n_raw, raw_s = raw_stream_rate(dsn, "rawslot", "rawpub", end_lsn)
        t0, cpu0 = time.perf_counter(), time.process_time()
        stream_stats = sync.run(hot_conf, once=True)
        e2e_s, e2e_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        server.destroy()

    raw_rate = n_raw / raw_s
    e2e_rate = stream_stats["changes"] / e2e_s
    print(f"machine: {os.cpu_count()} cores")
    print(f"raw pgoutput stream:   {n_raw:>9,} messages in {raw_s:6.2f} s = {raw_rate:>10,.0f} messages/s (no decoding)")
    print(f"pgfresh end to end:    {stream_stats['changes']:>9,} changes  in {e2e_s:6.2f} s = {e2e_rate:>10,.0f} changes/s "
          f"into the row store ({e2e_rate / raw_rate:.2f} x raw)")
    print(f"  pgfresh's own CPU (all threads, not the servers'): {e2e_cpu / stream_stats['changes'] * 1e6:.1f} us/change; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"COPY TO STDOUT:        {copied:>9,} rows     in {copy_s:6.2f} s = {copied / copy_s:>10,.0f} rows/s")
    print(f"pgfresh snapshot:      {stats['snapshot_rows']:>9,} rows     in {snap_s:6.2f} s = "
          f"{stats['snapshot_rows'] / snap_s:>10,.0f} rows/s ({copy_s / snap_s:.2f} x COPY, {floor_s / snap_s:.2f} x the "
          "store's floor), chunked, short transactions")
    print(f"store's floor:         {copied:>9,} rows     in {floor_s:6.2f} s = {copied / floor_s:>10,.0f} rows/s "
          f"({copy_s / floor_s:.2f} x COPY): one COPY out, each row COPied into two indexed tables")


if __name__ == "__main__":
    main()
