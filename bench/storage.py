"""pgfresh's storage per byte of source table under the shop workload (issue 9's benchmark).

A fresh embedded server, the shop workload seeded at --shops x --products-per-shop, `pgfresh sync`
(the RAG index and the facts worker, as shop.toml asks) in its own process, and the workload at
--rate changes/s for --minutes. Every --sample seconds it prints pg_total_relation_size of
pgfresh's tables (schema pgfresh) against the source tables (schema shop) and their ratio, and at
the end the largest pgfresh tables and whether autovacuum ran on them.

`--retention KEY=VALUE` adds [retention] keys (the code before issue 9 has no such section: leave
them out to measure it). Run the same command against another checkout with PYTHONPATH.

Run: PYTHONPATH=. .venv/bin/python bench/storage.py --minutes 3 --rate 50 [--embedder minilm-int8]
     [--retention change_log_keep_seconds=30 ...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from pgfresh import config as cfg
from pgfresh.arena import settings as arena_settings
from pgfresh.arena.workload import drive, load_workload, shop_config_text
from pgfresh.embedded import EmbeddedServer

SIZES = """
select n.nspname, c.relname, pg_total_relation_size(c.oid)
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('r', 'p', 'm') and n.nspname in ('pgfresh', 'shop')
"""


def sizes(conn) -> tuple[int, int, dict]:
    by_table = {(s, t): b for s, t, b in conn.execute(SIZES)}
    src = sum(b for (s, _), b in by_table.items() if s == "shop")
    ours = sum(b for (s, _), b in by_table.items() if s == "pgfresh")
    return src, ours, by_table


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=50.0, help="workload changes per second")
    ap.add_argument("--shops", type=int, default=40)
    ap.add_argument("--products-per-shop", type=int, default=1000)
    ap.add_argument("--notes-per-shop", type=int, default=500)
    ap.add_argument("--catch-up-limit", type=float, default=900, help="seconds to wait for the snapshot's documents")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between size samples")
    ap.add_argument("--embedder", default=None, help="[rag] embedder (default: shop.toml's, minilm)")
    ap.add_argument("--retention", action="append", default=[], metavar="KEY=VALUE", help="a [retention] key")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pgfresh-bench-storage-"))
    server = EmbeddedServer(work / "pg")
    dsn = server.start()
    sync_proc = workload_proc = None
    try:
        text = shop_config_text({"dsn": dsn, "data_dir": str(work / "data")})
        text = text.replace("[arena]\n", "[arena]\n"
                            f"rate_per_s = {args.rate}\n"
                            f"scale = {{ shops = {args.shops}, products_per_shop = {args.products_per_shop},"
                            f" notes_per_shop = {args.notes_per_shop} }}\n", 1)
        if args.embedder:
            text = text.replace("\n[rag]\n", f'\n[rag]\nembedder = "{args.embedder}"\n', 1)
        if args.retention:
            text += "\n[retention]\n" + "".join(f"{kv}\n" for kv in args.retention)
        path = work / "pgfresh.toml"
        path.write_text(text)
        config = cfg.load(path)
        s = arena_settings.settings(config)
        with psycopg.connect(dsn, autocommit=True) as conn:
            t0 = time.monotonic()
            load_workload(config, s).setup(conn)
            conn.execute("vacuum analyze")
            print(f"seeded {args.shops * args.products_per_shop} products in {time.monotonic() - t0:.0f} s")

            env = dict(os.environ, HF_HUB_OFFLINE="1")
            log = open(work / "sync.log", "w")
            sync_proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", str(path)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
            # The snapshot and its documents first, then the live workload.
            while True:
                time.sleep(2)
                if sync_proc.poll() is not None:
                    raise SystemExit(f"pgfresh sync exited: {(work / 'sync.log').read_text()[-2000:]}")
                row = conn.execute("select coalesce(bool_and(done), false) from pgfresh.snapshot_progress").fetchone() \
                    if conn.execute("select to_regclass('pgfresh.snapshot_progress')").fetchone()[0] else (False,)
                if row[0]:
                    break
            # ... and every consumer through it (the index embeds every snapshot row first).
            while sync_proc.poll() is None and time.monotonic() - t0 < args.catch_up_limit:
                (behind,) = conn.execute(
                    "select (select count(*) from pgfresh.consumers) < 2 or exists (select 1 from pgfresh.changes"
                    " where seq > (select min(seq) from pgfresh.consumers))").fetchone()
                if not behind:
                    break
                time.sleep(2)
            src, ours, _ = sizes(conn)
            print(f"consumers caught up after {time.monotonic() - t0:.0f} s")
            print(f"snapshot done after {time.monotonic() - t0:.0f} s: source {mb(src)}, pgfresh {mb(ours)}")

            spawn = mp.get_context("spawn")
            stop, counter, errors = spawn.Event(), spawn.Value("q", 0), spawn.Queue()
            workload_proc = spawn.Process(target=drive, args=(config, s, dsn, stop, counter, errors), daemon=True)
            workload_proc.start()
            began = time.monotonic()
            print(f"{'s':>5} {'changes':>8} {'unread':>7} {'source':>9} {'pgfresh':>9} {'ratio':>6}  largest")
            while True:
                elapsed = time.monotonic() - began
                time.sleep(max(0.0, min(args.sample, args.minutes * 60 - elapsed)))
                elapsed = time.monotonic() - began
                src, ours, by_table = sizes(conn)
                (unread,) = conn.execute(
                    "select count(*) from pgfresh.changes where seq > coalesce((select min(seq) from"
                    " pgfresh.consumers), 0)").fetchone()
                top = sorted(((b, t) for (sch, t), b in by_table.items() if sch == "pgfresh"), reverse=True)[:4]
                print(f"{elapsed:5.0f} {counter.value:8d} {unread:7d} {mb(src):>9} {mb(ours):>9} {ours / src:6.2f}  "
                      + ", ".join(f"{t} {mb(b)}" for b, t in top), flush=True)
                if elapsed >= args.minutes * 60 - 0.5:
                    break
                if sync_proc.poll() is not None:
                    raise SystemExit(f"pgfresh sync exited: {(work / 'sync.log').read_text()[-2000:]}")
            stop.set()
            workload_proc.join(30)
            print(f"\nworkload: {counter.value} changes in {elapsed:.0f} s ({counter.value / elapsed:.1f}/s)")
            src, ours, by_table = sizes(conn)
            print(f"source tables {mb(src)}, pgfresh {mb(ours)}: {ours / src:.2f} bytes per source byte")
            for (sch, t), b in sorted(by_table.items(), key=lambda kv: -kv[1]):
                if b >= 256 * 1024:
                    print(f"  {sch}.{t}: {mb(b)}")
            vac = conn.execute(
                "select relname, autovacuum_count, autoanalyze_count, n_live_tup, n_dead_tup from pg_stat_user_tables"
                " where schemaname = 'pgfresh' and relname in ('changes', 'gate_log', 'rows', 'facts', 'documents')"
                " order by relname").fetchall()
            print("autovacuum (table, autovacuum runs, autoanalyze runs, live, dead tuples):")
            for r in vac:
                print("  ", *r)
            if conn.execute("select to_regclass('pgfresh.retention')").fetchone()[0]:
                print("pruned:", conn.execute("select name, rows_pruned, pruned_through from pgfresh.retention"
                                              " order by name").fetchall())
    finally:
        if workload_proc is not None and workload_proc.is_alive():
            workload_proc.terminate()
        if sync_proc is not None and sync_proc.poll() is None:
            sync_proc.terminate()
            try:
                sync_proc.wait(60)
            except subprocess.TimeoutExpired:
                sync_proc.kill()
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
