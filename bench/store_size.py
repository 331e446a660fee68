"""Source database growth from pgfresh state: store in the source vs a store of its own."""
import sys, tempfile, time
from pathlib import Path
import psycopg
from pgfresh import config as cfg
from pgfresh.capture import sync
from pgfresh.embedded import EmbeddedServer

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
work = Path(tempfile.mkdtemp())
server = EmbeddedServer(work / "pg")
admin = server.start()
try:
    for layout in ("store in the source", "store of its own"):
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("drop database if exists src with (force)"); c.execute("drop database if exists sto with (force)")
            c.execute("create database src"); c.execute("create database sto")
        src = server.dsn("src")
        store = src if layout == "store in the source" else server.dsn("sto")
        with psycopg.connect(src, autocommit=True) as c:
            c.execute("create table items (id int primary key, name text, price int)")
            c.execute("insert into items select g, 'item ' || g, g from generate_series(1, %s) g", (N,))
            c.execute("checkpoint")
            before = c.execute("select pg_database_size(current_database())").fetchone()[0]
            conf = cfg.parse({"source": {"dsn": src}, "store": {"dsn": store}, "tables": [{"name": "items"}]},
                             work / "pgfresh.toml")
            sync.run(conf, once=True)
            c.execute("update items set price = price + 1")
            t0 = time.monotonic(); sync.run(conf, once=True); t = time.monotonic() - t0
            after = c.execute("select pg_database_size(current_database())").fetchone()[0]
            c.execute("select pg_drop_replication_slot('pgfresh')")
        print(f"{layout}: {N} rows snapshot + {N} updates streamed: source database grew {(after - before) / 2**20:.1f} MB "
              f"(stream catch-up {t:.1f} s)")
finally:
    server.destroy()
