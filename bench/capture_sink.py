"""The row-store sink alone: its store transaction per streamed change, with and without migration 016.

Streamed updates (the `hot` workload of bench/capture.py: 1,000-row transactions over 10,000 keys,
5,000 changes a sink batch) go through `RowStore.apply_transactions`: COPY into the stage, the
change-log insert, the row-store upsert, the stored LSN and the commit. No stream, no decoding: this
is the store's share of capture's cost. The two layouts of `pgfresh.rows` alternate in one run on one
server:
- before 016: the tombstone index on (pipeline, commit_time), so no update can be HOT; fillfactor 100;
- 016, SQL dedup: 016's layout, with the upsert as it was before: the server picks each key's last
  change of the batch and counts its versions (a sort and a window over the batch);
- 016: the tombstone index on (pipeline) only, fillfactor 80, and capture marks each key's last
  change and its count while staging.

Run: .venv/bin/python bench/capture_sink.py [--batches 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime, timezone

import psycopg

from pgfresh import db
from pgfresh.capture.change import Change
from pgfresh.capture import rowstore
from pgfresh.capture.rowstore import RowStore
from pgfresh.capture.setup import TableInfo
from pgfresh.capture.stream import Transaction
from pgfresh.embedded import EmbeddedServer

KEYS = 10_000
BEFORE_016 = ["drop index pgfresh.rows_tombstones",
              "create index rows_tombstones on pgfresh.rows (pipeline, commit_time) where deleted",
              "alter table pgfresh.rows set (fillfactor = 100)", "vacuum full pgfresh.rows"]
AFTER_016 = ["drop index pgfresh.rows_tombstones", "create index rows_tombstones on pgfresh.rows (pipeline) where deleted",
             "alter table pgfresh.rows set (fillfactor = 80)", "vacuum full pgfresh.rows"]
UPSERT_SORTED = """
insert into pgfresh.rows as r (pipeline, tbl, key, tenant, row, lsn, commit_time, deleted, xid, snap, versions)
select distinct on (tbl, key) %(pipeline)s, tbl, key, tenant, row, lsn, commit_time, op = 'delete', xid,
       null::pg_snapshot, count(*) over (partition by tbl, key)
from pgfresh_stage order by tbl, key, ord desc
on conflict (pipeline, tbl, key) do update set
    tenant = excluded.tenant, row = excluded.row, lsn = excluded.lsn, commit_time = excluded.commit_time,
    deleted = excluded.deleted, xid = excluded.xid, snap = null, versions = r.versions + excluded.versions
"""
LAYOUTS = {  # name: (statements, upsert)
    "before 016": (BEFORE_016, UPSERT_SORTED),
    "016, SQL dedup": (AFTER_016, UPSERT_SORTED),
    "016": (AFTER_016, rowstore._UPSERT_STREAM),
}


def transactions(first_lsn: int, first_xid: int, n_changes: int, start_key: int) -> list[Transaction]:
    """`n_changes` updates in 1,000-change transactions, keys in order from `start_key`."""
    txs = []
    for t in range(n_changes // 1000):
        end, xid, when = first_lsn + t + 1, first_xid + t, datetime.now(timezone.utc)
        changes = []
        for i in range(1000):
            k = (start_key + t * 1000 + i) % KEYS + 1
            c = Change("public.hot", "update", [k], {"id": k, "v": end, "price": "1.23", "name": f"hot {k}"},
                       end, when, xid=xid)
            changes.append(c)
        txs.append(Transaction(xid, end, when, changes))
    return txs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20, help="5,000-change sink batches per layout and round")
    ap.add_argument("--rounds", type=int, default=2, help="times each layout is measured, alternating")
    args = ap.parse_args()
    server = EmbeddedServer(os.path.join(tempfile.mkdtemp(prefix="pgfresh-bench-"), "pg"))
    dsn = server.start()
    try:
        store = psycopg.connect(dsn, autocommit=True)
        source = psycopg.connect(dsn, autocommit=True)
        db.migrate(store)
        info = TableInfo("public.hot", ["id", "v", "price", "name"], [23, 23, 1700, 25],
                         ["integer", "integer", "numeric", "text"], ["id"], None)
        rows = RowStore(store, {"public.hot": info}, "bench", source=source)
        rows.start("0/1", created=True)
        rows.snapshot_pending = []  # no snapshot: every change comes from the "stream"
        (xid_now,) = source.execute("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
        lsn, xid = 1 << 32, xid_now & 0xFFFFFFFF
        rows.apply_transactions(transactions(lsn, xid, KEYS, 0))  # every key once: the table is full
        lsn += KEYS
        results: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(args.rounds):
            for name, (statements, upsert) in LAYOUTS.items():
                for s in statements:
                    store.execute(s)
                rowstore._UPSERT_STREAM = upsert
                before = store.execute("select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables"
                                       " where relid = 'pgfresh.rows'::regclass").fetchone()
                batches = [transactions(lsn + b * 5, xid, 5000, b * 5000) for b in range(args.batches)]
                t0 = time.perf_counter()
                for b in batches:
                    rows.apply_transactions(b)
                elapsed = time.perf_counter() - t0
                lsn += args.batches * 5
                time.sleep(0.7)  # the statistics collector's delay
                after = store.execute("select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables"
                                      " where relid = 'pgfresh.rows'::regclass").fetchone()
                n = args.batches * 5000
                hot = (after[1] - before[1]) / max(1, after[0] - before[0])
                results[name].append(elapsed / n * 1e6)
                print(f"{name:>14}: {elapsed / n * 1e6:6.1f} us/change in the store transaction "
                      f"({n / elapsed:,.0f} changes/s), {hot:.0%} of row updates HOT, "
                      f"load average {os.getloadavg()[0]:.1f}")
        best = {name: min(r) for name, r in results.items()}
        print(f"best of {args.rounds}: " + ", ".join(f"{name} {us:.1f} us/change ({best['before 016'] / us:.2f} x)"
                                                      for name, us in best.items()))
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
