"""WAL the source writes with pgfresh capturing vs without: the same statements twice.

    python bench/source_wal.py [CHANGES]

Source and store on two embedded servers (as by default). The workload is
`pgfresh.arena.dbimpact.ledger_wal` (the same one tests/test_store.py asserts the goal on): a
captured ledger table, inserts of one row each, every fourth followed by an update of the row
before, one transaction each; once from a CHECKPOINT as warm-up, then once without pgfresh and
once with `pgfresh sync` streaming it into the store (started before the window). Prints the
source's WAL bytes per change (pg_current_wal_lsn deltas) and what pgfresh added.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import psycopg

from pgfresh import config as cfg
from pgfresh.arena import dbimpact
from pgfresh.embedded import EmbeddedServer


def main(changes: int = 6000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source, store = EmbeddedServer(Path(tmp) / "pg"), EmbeddedServer(Path(tmp) / "store")
        try:
            dsn, store_dsn = source.start(), store.start()
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(dbimpact.LEDGER_SQL)
            path = Path(tmp) / "pgfresh.toml"
            path.write_text(f'store = {{ dsn = "{store_dsn}" }}\n[source]\ndsn = "{dsn}"\n'
                            '[[tables]]\nname = "ledger"\n')
            r = dbimpact.ledger_wal(cfg.load(path), dsn, store_dsn, inserts=changes * 4 // 5)
        finally:
            source.stop("immediate")
            store.stop("immediate")
    without, with_ = r["without_pgfresh"], r["with_pgfresh"]
    print(f"load average {os.getloadavg()[0]:.1f}; {without['changes']} changes per window")
    print(f"source WAL without pgfresh: {without['wal_bytes']} bytes ({without['bytes_per_change']:.1f} per change)")
    print(f"source WAL with pgfresh:    {with_['wal_bytes']} bytes ({with_['bytes_per_change']:.1f} per change)")
    print(f"pgfresh added {with_['wal_bytes'] - without['wal_bytes']:+d} bytes: {r['added_share']:+.3%} (goal under 1%)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6000)
