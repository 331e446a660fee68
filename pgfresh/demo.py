"""`pgfresh demo`: the whole path on the embedded server, with nothing to configure.

It starts (or reuses) an embedded PostgreSQL in the demo directory, creates a small sample shop
database, captures it (snapshot + stream) while a writer changes prices, stock and products live,
and prints what capture delivered: counts, lag, and the last changes of the change log.
When the arena is installed (`pgfresh.arena`), the demo runs a short arena instead (issue 6).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import psycopg

from pgfresh import config as cfg
from pgfresh.capture import sync
from pgfresh.embedded import EmbeddedServer

DB = "pgfresh_demo"

SCHEMA = """
create table if not exists products (
    id int primary key, shop_id int not null, name text not null, category text,
    price numeric(10,2) not null, stock int not null, status text not null default 'published', description text);
"""


def _seed(dsn: str, rng: random.Random) -> None:
    words = ["lamp", "chair", "kettle", "mug", "desk", "shelf", "rug", "clock", "vase", "pillow"]
    colours = ["red", "oak", "steel", "blue", "linen", "walnut", "green", "white"]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SCHEMA)
        if c.execute("select count(*) from products").fetchone()[0]:
            return
        with c.cursor().copy("copy products (id, shop_id, name, category, price, stock, description) from stdin") as cp:
            for i in range(1, 2001):
                name = f"{rng.choice(colours)} {rng.choice(words)} {i}"
                cp.write_row((i, 1 + i % 3, name, rng.choice(words), round(rng.uniform(3, 300), 2),
                              rng.randint(0, 50), f"A {name} for everyday use."))


def _writer(dsn: str, stop: threading.Event, rng: random.Random, counts: dict) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        next_id = c.execute("select max(id) + 1 from products").fetchone()[0]
        while not stop.is_set():
            r = rng.random()
            if r < 0.7:
                cur = c.execute("update products set price = round((price * %s)::numeric, 2), stock = greatest(stock - 1, 0)"
                          " where id = %s", (rng.uniform(0.9, 1.1), rng.randint(1, next_id - 1)))
            elif r < 0.9:
                cur = c.execute("insert into products (id, shop_id, name, category, price, stock) values (%s, %s, %s, 'new', %s, 5)",
                          (next_id, 1 + next_id % 3, f"new item {next_id}", round(rng.uniform(3, 300), 2)))
                next_id += 1
            else:
                cur = c.execute("delete from products where id = %s", (rng.randint(1, next_id - 1),))
            counts["writes"] += cur.rowcount  # rows changed: a delete of a deleted row changes nothing
            time.sleep(0.01)


def run(workdir: Path, seconds: float = 20.0, console=None) -> dict:
    """Live capture of the sample database for `seconds`; returns (and prints) what was captured."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(workdir / "pg")
    admin = server.start()
    with psycopg.connect(admin, autocommit=True) as c:
        if not c.execute("select 1 from pg_database where datname = %s", (DB,)).fetchone():
            c.execute(f"create database {DB}")  # a constant name, not user input
    dsn = server.dsn(DB)
    rng = random.Random(42)
    _seed(dsn, rng)
    config = cfg.parse({"source": {"dsn": dsn}, "tables": [{"name": "products", "tenant": "shop_id"}]},
                       workdir / "pgfresh.toml")
    stop, capture_stop = threading.Event(), threading.Event()
    counts = {"writes": 0}
    writer = threading.Thread(target=_writer, args=(dsn, stop, rng, counts))
    result: dict = {}
    capture = threading.Thread(target=lambda: result.update(sync.run(config, stop=capture_stop)))
    started = time.monotonic()
    capture.start()
    writer.start()
    if console:
        console.print(f"[bold]pgfresh demo[/]: embedded PostgreSQL at {workdir / 'pg'}; capturing while a writer "
                      f"changes products for {seconds:.0f} s")
    time.sleep(seconds)
    stop.set()
    writer.join()
    time.sleep(1.0)  # let capture apply the writer's last transactions
    capture_stop.set()
    capture.join()
    elapsed = time.monotonic() - started
    with psycopg.connect(dsn, autocommit=True) as c:
        live, dead = c.execute("select count(*) filter (where not deleted), count(*) filter (where deleted)"
                               " from pgfresh.rows").fetchone()
        source = c.execute("select count(*) from products").fetchone()[0]
        last = c.execute("select op, key, row->>'name', row->>'price', commit_time from pgfresh.changes"
                         " where op <> 'read' order by seq desc limit 5").fetchall()
    summary = {"seconds": round(elapsed, 1), "source_rows": source, "captured_rows": live, "tombstones": dead,
               "writes": counts["writes"], **result}
    if console:
        console.print(f"captured {live} live rows (source has {source}), {dead} deletes kept as tombstones; "
                      f"{result.get('changes', 0)} changes streamed from {counts['writes']} writes")
        for op, key, name, price, ts in last:
            console.print(f"  {ts:%H:%M:%S.%f} {op:7} products{key} {name} {price}")
    return summary
