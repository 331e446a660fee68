"""The hybrid router's phrasing lookup (migration 018) at scale: which rows a question names.

    .venv/bin/python bench/phrasing_lookup.py [--facts 1000000] [--lookups 500] [--workdir /tmp/pgfresh-phrasing]

On an embedded server of its own (kept in --workdir), migrates a store and fills pgfresh.facts with
--facts active 'qa' facts of 100 tenants, three phrasings each (as the shop's templates give), then
times --lookups lookups of held-in phrasings (`serve.answer._named_rows`, the query hybrid answers
run), against the baseline in the same run: the same number of primary-key lookups of one fact.
Three times: right after the load, before any statistics (the planner picks the tenant index and
filters its facts), after ANALYZE (as autovacuum leaves a store), and with bitmap scans switched off
(what the lookup costs without migration 018's index). Prints the load time against the same load into a
copy of the table with every index but this one (the index is written with every fact:
`fastupdate = off`, so a lookup never scans a pending list), ms per lookup, the ratio to the
baseline and the index's size. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psycopg  # noqa: E402

from pgfresh import db  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402
from pgfresh.serve.answer import _named_rows  # noqa: E402


def per_call_ms(conn, n: int, call) -> float:
    t = time.perf_counter()
    for i in range(n):
        call(conn, i)
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--workdir", default="/tmp/pgfresh-phrasing")
    args = ap.parse_args()
    server = EmbeddedServer(Path(args.workdir) / "data")
    server.start()
    n, stride = args.facts, max(1, args.facts // args.lookups)
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("drop schema if exists pgfresh cascade")
            db.migrate(conn)
            load = ("insert into {} (fact_id, tbl, key, tenant, kind, template, question, paraphrases, answer, lsn)"
                    " select md5(i::text), 'shop.products', '[' || i || ']', 'shop' || (i %% 100), 'qa', 'price',"
                    "  'What is the price of Product ' || i || '?',"
                    "  array['How much does Product ' || i || ' cost?', 'Price of Product ' || i || '?'], i::text, '0/1'"
                    " from generate_series(1, %s) i")
            # the write side's baseline: the same rows into pgfresh.facts's indexes but this one
            conn.execute("create table pgfresh.facts_018_baseline (like pgfresh.facts including all)")
            for (name,) in conn.execute("select indexname from pg_indexes where schemaname = 'pgfresh' and"
                                        " tablename = 'facts_018_baseline' and indexdef like '%%phrasing_keys%%'").fetchall():
                conn.execute(f"drop index pgfresh.{name}")
            t = time.perf_counter()
            conn.execute(load.format("pgfresh.facts_018_baseline"), (n,))
            without = time.perf_counter() - t
            conn.execute("drop table pgfresh.facts_018_baseline")
            t = time.perf_counter()
            conn.execute(load.format("pgfresh.facts"), (n,))
            took = time.perf_counter() - t
            print(f"{n:,} facts loaded in {took:.1f} s with the phrasing index, {without:.1f} s without it"
                  f" ({took / without:.2f}x; per fact {took / n * 1e6:.0f} vs {without / n * 1e6:.0f} us)")

            def lookup(c, i):
                row = i * stride % n + 1
                found = _named_rows(c, f"How much does Product {row} cost?", f"shop{row % 100}")
                assert found == [("shop.products", f"[{row}]")], found

            def baseline(c, i):
                c.execute("select tbl, key from pgfresh.facts where fact_id = md5(%s)", (str(i * stride % n + 1),)).fetchall()

            size = lambda: conn.execute("select pg_size_pretty(pg_relation_size('pgfresh.facts_by_phrasing'))").fetchone()[0]  # noqa: E731
            per_call_ms(conn, 50, baseline)  # warm the caches
            for label, before in (("before statistics", None), ("after ANALYZE", "analyze pgfresh.facts"),
                                  ("without the index", "set enable_bitmapscan = off")):
                if before:
                    conn.execute(before)
                lookups = args.lookups if label != "without the index" else max(5, args.lookups // 100)
                base = per_call_ms(conn, lookups, baseline)
                got = per_call_ms(conn, lookups, lookup)
                print(f"{label:32} lookup {got:8.2f} ms   primary key {base:.3f} ms   ratio {got / base:7.1f}x"
                      f"   ({lookups} lookups; index {size()})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
