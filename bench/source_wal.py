"""WAL the source writes with pgfresh capturing vs without: the same statements twice.

    python bench/source_wal.py [CHANGES]

Source and store on two embedded servers (as by default). A ledger table is captured (snapshot
first); the workload (inserts of one row each, every fourth followed by an update of the row
before, one transaction each) runs once from a CHECKPOINT as warm-up, then once without pgfresh
and once with `pgfresh sync` streaming it into the store (started before the window), neither of
those two from a checkpoint, so neither pays a full-page image the other does not. Prints the
source's WAL bytes per change (pg_current_wal_lsn deltas) and what pgfresh added.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from pgfresh import config as cfg
from pgfresh.arena import dbimpact
from pgfresh.capture import sync
from pgfresh.embedded import EmbeddedServer


def main(changes: int = 6000) -> None:
    inserts = changes * 4 // 5
    with tempfile.TemporaryDirectory() as tmp:
        source, store = EmbeddedServer(Path(tmp) / "pg"), EmbeddedServer(Path(tmp) / "store")
        try:
            dsn, store_dsn = source.start(), store.start()
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("create table ledger (id bigint primary key, account int not null, amount int not null,"
                          " note text) with (autovacuum_enabled = off)")  # its WAL would land in one window only
            path = Path(tmp) / "pgfresh.toml"
            path.write_text(f'store = {{ dsn = "{store_dsn}" }}\n[source]\ndsn = "{dsn}"\n'
                            '[[tables]]\nname = "ledger"\n')
            config = cfg.load(path)
            sync.run(config, once=True)
            ids = iter(range(1, 10**9))
            last = [0]

            def workload() -> int:
                n = 0
                with psycopg.connect(dsn, autocommit=True) as w:
                    for _ in range(inserts):
                        i = next(ids)
                        w.execute("insert into ledger values (%s, %s, %s, 'payment received')", (i, i % 97, i % 1000))
                        n += 1
                        if i % 4 == 0:
                            w.execute("update ledger set amount = amount + 1 where id = %s", (i - 1,))
                            n += 1
                last[0] = i
                return n

            def captured() -> None:
                with psycopg.connect(store_dsn, autocommit=True) as s:
                    while not s.execute("select exists (select 1 from pgfresh.rows where key = %s)",
                                        (f"[{last[0]}]",)).fetchone()[0]:
                        time.sleep(0.1)

            dbimpact.wal_window(dsn, workload)
            without = dbimpact.wal_window(dsn, workload, checkpoint=False)
            stop = threading.Event()
            t = threading.Thread(target=sync.run, args=(config,), kwargs={"stop": stop})
            t.start()
            with psycopg.connect(dsn, autocommit=True) as c:
                while not c.execute("select active from pg_replication_slots").fetchone()[0]:
                    time.sleep(0.1)
            with_ = dbimpact.wal_window(dsn, workload, captured, checkpoint=False)
            stop.set()
            t.join()
        finally:
            source.stop("immediate")
            store.stop("immediate")
    share = dbimpact.wal_share(without, with_)
    print(f"load average {os.getloadavg()[0]:.1f}; {without['changes']} changes per window")
    print(f"source WAL without pgfresh: {without['wal_bytes']} bytes ({without['bytes_per_change']:.1f} per change)")
    print(f"source WAL with pgfresh:    {with_['wal_bytes']} bytes ({with_['bytes_per_change']:.1f} per change)")
    print(f"pgfresh added {with_['wal_bytes'] - without['wal_bytes']:+d} bytes: {share:+.3%} (goal under 1%)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6000)
