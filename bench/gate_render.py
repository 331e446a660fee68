"""Gate + render throughput: the facts worker (consumer 'facts') on changes already in the log.

Capture first fills `pgfresh.changes` with N streamed inserts (no facts worker running), then the
facts worker alone drains them: gate (junk, PII, render, dedup, near-duplicates) + facts with
paraphrases + supersession, one transaction per batch. Figures printed: changes/s, the slowest
step against `max_txn_seconds`, and facts written; then the same with near-duplicate reports off,
to show what they cost.

Run: .venv/bin/python bench/gate_render.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
from pathlib import Path

import psycopg

from pgfresh import config as cfg
from pgfresh.capture import sync
from pgfresh.embedded import EmbeddedServer
from pgfresh.render.worker import FactsWorker

TABLE = """
[[tables]]
name = "products"
[tables.gate.train]
settle_seconds = 0
near_duplicates = {near}
"""
FACTS = """
[[tables.facts]]
name = "price"
question = "What is the price of {name}?"
answer = "{price} EUR"
"""


def run(server: EmbeddedServer, rows: int, near: bool) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute("drop database if exists bench_gate with (force)")
        admin.execute("create database bench_gate")
    dsn = server.dsn("bench_gate")
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("create table products (id int primary key, name text, price numeric, description text)")
        head = f'store = {{ dsn = "{dsn}" }}\n[source]\ndsn = "{dsn}"\n' + TABLE.format(near=str(near).lower())
        config = cfg.parse(tomllib.loads(head))
        sync.run(config, once=True)  # slot and schema; no [train], no fact templates: no facts worker yet
        for lo in range(1, rows + 1, 1000):
            db.execute("insert into products select g, 'Product ' || g, (g %% 500) + 0.99, 'A sturdy product,"
                       " number ' || g || ', for everyday use; questions: +1 415 555 ' || (1000 + g %% 9000)"
                       " from generate_series(%s::int, %s::int) g", (lo, min(lo + 999, rows)))
        sync.run(config, once=True)
        path = Path(tempfile.mkdtemp()) / "pgfresh.toml"
        path.write_text(head + FACTS)
        worker = FactsWorker(cfg.load(path))
        started, slowest = time.monotonic(), 0.0
        while True:
            t = time.monotonic()
            n = worker.step()
            slowest = max(slowest, time.monotonic() - t)
            if not n:
                break
        seconds = time.monotonic() - started
        worker.close()
        facts = db.execute("select count(*) from pgfresh.facts").fetchone()[0]
    print(f"near_duplicates={near!s:5}  {rows} changes in {seconds:.1f} s = {rows / seconds:,.0f} changes/s;"
          f" slowest step {slowest:.2f} s (max_txn_seconds 5); {facts} facts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "pg")
        server.start()
        try:
            for near in (True, False):
                run(server, args.rows, near)
        finally:
            server.destroy()


if __name__ == "__main__":
    main()
