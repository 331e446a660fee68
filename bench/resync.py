"""`pgfresh resync` after a lost slot, against the first snapshot of the same table.

Figures printed: seconds of the first `pgfresh sync --once` (snapshot of --rows rows), of the `sync`
that refuses once the slot is dropped, and of `pgfresh resync` after a tenth of the rows were
deleted and a seventh updated meanwhile, with the counts it printed. Real processes, an embedded
server of its own in a temporary directory.

Run: .venv/bin/python bench/resync.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from pgfresh.embedded import EmbeddedServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "pg")
        try:
            dsn = server.start()
            config = Path(tmp) / "pgfresh.toml"
            config.write_text(f'[source]\ndsn = "{dsn}"\n[[tables]]\nname = "t"\n')
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("create table t (id int primary key, v int, pad text)")
                c.execute("insert into t select g, 0, repeat('x', 60) from generate_series(1, %s) g", (args.rows,))

            def cli(*a):
                started = time.monotonic()
                r = subprocess.run([sys.executable, "-m", "pgfresh", *a, "--config", str(config)],
                                   capture_output=True, text=True)
                return r, time.monotonic() - started

            r, sec = cli("sync", "--once")
            print(f"first sync --once: {sec:.1f} s ({r.stdout.strip()})")
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("select pg_drop_replication_slot('pgfresh')")
                c.execute("delete from t where id % 10 = 0")
                c.execute("update t set v = 1 where id % 7 = 0")
            r, sec = cli("sync", "--once")
            print(f"sync with the slot dropped: exit {r.returncode} in {sec:.1f} s")
            r, sec = cli("resync")
            print(f"resync: {sec:.1f} s ({' '.join(r.stdout.split())})")
        finally:
            server.destroy()


if __name__ == "__main__":
    main()
