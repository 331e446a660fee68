"""store: pgfresh keeps its state in a store of its own; the source gets a publication and a slot only.

The default layout: `source.dsn` unset and no [store] gives two embedded servers in the data
directory (`pg` for the source, `store` for pgfresh), two data directories, two ports.
"""

from __future__ import annotations

import psycopg
import pytest

from pgfresh import config as cfg
from pgfresh import db, rag, serve
from pgfresh.capture import setup, sync
from pgfresh.embedded import EmbeddedServer
from pgfresh.gate import quarantine
from pgfresh.serve import metrics as serve_metrics
from tests.conftest import run_cli

PROJECT = """
[source]
data_dir = "data"
max_txn_seconds = 5
snapshot_chunk_rows = 7

[[tables]]
name = "public.products"
tenant = "shop"
document = "{name} is made in {city} and costs {price} EUR."
[tables.gate]
ranges = { price = [0, 1000] }
[tables.gate.train]
settle_seconds = 0
[[tables.facts]]
name = "price"
question = "What is the price of {name}?"
answer = "{price} EUR"
gone = "{name} is no longer available."

[train]

[rag]
"""


def _source_objects(conn) -> dict:
    """Everything in the source catalog that is not PostgreSQL's own or the test's table."""
    return {
        "schemas": conn.execute("select nspname from pg_namespace where nspname not like 'pg\\_%%'"
                                " and nspname not in ('information_schema', 'public')").fetchall(),
        "relations": conn.execute("select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                                  " where n.nspname = 'public' and c.relname not like 'products%%'").fetchall(),
        "functions": conn.execute("select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
                                  " where n.nspname not in ('pg_catalog', 'information_schema')").fetchall(),
        "extensions": conn.execute("select extname from pg_extension where extname <> 'plpgsql'").fetchall(),
        "types": conn.execute("select t.typname from pg_type t join pg_namespace n on n.oid = t.typnamespace"
                              " where n.nspname = 'public' and t.typname not like '%%products'").fetchall(),
    }


def _gauge(text: str, name: str, labels: str) -> float:
    """One sample of a Prometheus text exposition (fails if it is not there exactly once)."""
    (value,) = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name}{{{labels}}} ")]
    return value


def test_source_and_store_on_two_embedded_servers(tmp_path):
    path = tmp_path / "pgfresh.toml"
    path.write_text(PROJECT)
    config = cfg.load(path)
    source_server, store_server = EmbeddedServer(tmp_path / "data" / "pg"), EmbeddedServer(tmp_path / "data" / "store")
    try:
        source_dsn = setup.resolve_dsn(config)
        with psycopg.connect(source_dsn, autocommit=True) as src:
            src.execute("create table products (id int primary key, shop text not null, name text, city text,"
                        " price numeric)")
            src.execute("insert into products values (1, 'a', 'Zephyrine', 'Reykjavik', 12),"
                        " (2, 'a', 'Quillbrook', 'Valparaiso', 30), (3, 'b', 'Broken', 'Nowhere', -5)")
            src.execute("insert into products select g, 'b', 'thing ' || g, 'Oslo', g from generate_series(10, 40) g")
            sync.run(config, once=True)
            store_dsn = db.store_dsn(config)
            assert store_server.port != source_server.port
            assert store_dsn != source_dsn
            # Changes while capturing: the stream, into the store.
            src.execute("update products set price = 14 where id = 1")
            src.execute("delete from products where id = 2")
            src.execute("insert into products values (4, 'b', 'Marrowind', 'Lima', 7)")
            result = run_cli("sync", "--once", "--config", str(path))
            assert result.returncode == 0, result.stderr

            with psycopg.connect(store_dsn, autocommit=True) as store:
                live = store.execute("select key, row->>'price' from pgfresh.rows where not deleted and tbl ="
                                     " 'public.products' and key in ('[1]', '[2]', '[4]') order by key").fetchall()
                assert live == [("[1]", "14"), ("[4]", "7")]
                assert store.execute("select count(*) from pgfresh.rows where not deleted").fetchone()[0] == 34
                facts = dict(store.execute("select question, answer from pgfresh.facts where status = 'active'"
                                           " and tenant = 'a'").fetchall())
                assert facts["What is the price of Zephyrine?"] == "14 EUR"
                assert facts["What is the price of Quillbrook?"] == "Quillbrook is no longer available."
                docs = store.execute("select count(*) from pgfresh.documents").fetchone()[0]
                assert docs >= 33
            assert {e["key"] for e in quarantine.entries(config)} == {"[3]"}  # the gate's range check (per path)
            hits = rag.run_search(config, "Where is Marrowind made?", tenant="b", k=1, mode="lexical")
            assert [h.key for h in hits] == ["[4]"]
            answer = rag.ask(config, "What does Zephyrine cost?", "a")
            assert any(s["key"] == "[1]" for s in answer["sources"]), answer
            status = run_cli("status", "--json", "--config", str(path))
            assert status.returncode == 0, status.stderr
            assert '"state": "ok"' in status.stdout
            # /metrics reads the source's slot and lag from sync's heartbeat: serve never connects to the
            # source, and the store's server has no such slot (it used to read NaN there)
            text = serve_metrics.Metrics(config, serve.Registry()).render()[0].decode()
            for gauge in ("pgfresh_slot_retained_wal_bytes", "pgfresh_capture_lag_bytes"):
                assert 0 <= _gauge(text, gauge, 'source="pgfresh"') < 2**30, text
            assert 0 <= _gauge(text, "pgfresh_capture_heartbeat_age_seconds", 'source="pgfresh"') < 600

            # The source holds a publication and a slot, nothing else of pgfresh's.
            assert _source_objects(src) == {"schemas": [], "relations": [], "functions": [], "extensions": [],
                                            "types": []}
            assert src.execute("select pubname from pg_publication").fetchall() == [("pgfresh",)]
            assert src.execute("select slot_name from pg_replication_slots").fetchall() == [("pgfresh",)]
    finally:
        source_server.stop("immediate")
        store_server.stop("immediate")


FACTS = """
[train]

[[tables]]
name = "items"
[tables.gate.train]
settle_seconds = 0
[[tables.facts]]
name = "price"
question = "What is the price of {name}?"
answer = "{price} EUR"
"""


def test_state_kept_in_the_source_moves_to_the_store_and_capture_resumes(db, dsn, store, store_dsn, tmp_path):
    from tests.conftest import write_config

    db.execute("create table items (id int primary key, name text, price int)")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 50) g")
    old = write_config(tmp_path, dsn, FACTS)  # [store] dsn = the source database: the old layout
    assert run_cli("sync", "--once", "--config", str(old)).returncode == 0
    db.execute("update items set price = 500 where id = 1")
    assert run_cli("sync", "--once", "--config", str(old)).returncode == 0
    before = {t: db.execute(f"select count(*) from pgfresh.{t}").fetchone()[0]
              for t in ("rows", "changes", "facts", "sink_progress", "consumers", "workers")}
    assert before["rows"] == 50 and before["facts"] >= 51
    active_before = db.execute("select count(*) from pgfresh.facts where status = 'active'").fetchone()[0]

    new = write_config(tmp_path, dsn, FACTS, store=store_dsn)
    refused = run_cli("sync", "--once", "--config", str(new))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "pgfresh store migrate" in lines[0] and "DROP SCHEMA" in lines[0], refused.stderr
    assert db.execute("select to_regnamespace('pgfresh') is not null").fetchone()[0]  # nothing moved, nothing lost
    status = run_cli("status", "--json", "--config", str(new))
    assert status.returncode == 0 and "pgfresh store migrate" in status.stdout, (status.stdout, status.stderr)

    moved = run_cli("store", "migrate", "--json", "--config", str(new))
    assert moved.returncode == 0, moved.stderr
    assert db.execute("select to_regnamespace('pgfresh')").fetchone()[0] is None
    after = {t: store.execute(f"select count(*) from pgfresh.{t}").fetchone()[0] for t in before}
    assert after == before
    again = run_cli("store", "migrate", "--config", str(new))
    assert again.returncode == 2 and "nothing to move" in again.stderr

    # Capture resumes from the copied position: the stream, no new snapshot, no duplicate fact.
    db.execute("update items set price = 7 where id = 2")
    assert run_cli("sync", "--once", "--config", str(new)).returncode == 0
    assert store.execute("select count(*) from pgfresh.changes where op = 'read'").fetchone()[0] <= before["changes"]
    active = dict(store.execute("select key, answer from pgfresh.facts where status = 'active'"
                                " and template = 'price'").fetchall())
    assert active["[1]"] == "500 EUR" and active["[2]"] == "7 EUR"
    assert store.execute("select count(*) from pgfresh.facts where status = 'active'").fetchone()[0] == active_before


def test_pgfresh_adds_under_one_percent_to_the_wal_the_source_writes(tmp_path):
    """The same statements twice, after a first run from a CHECKPOINT (so neither window pays a full-page
    image the other does not): the source's WAL without pgfresh, then with `pgfresh sync` streaming it (started before the window: the live phase, not
    the set-up). The store is a server of its own, as by default. pgfresh writes nothing to the
    source; what it adds is asserted under 1%. The source is a server of its own too, autovacuum
    off: WAL is server-wide, and the session server's other databases (or a vacuum) would write
    into one window only."""
    source_server = EmbeddedServer(tmp_path / "source", settings={"autovacuum": "off"})
    store_server = EmbeddedServer(tmp_path / "store")
    try:
        dsn = source_server.start()
        with psycopg.connect(dsn, autocommit=True) as db:
            _wal_windows(db, dsn, tmp_path, store_server.start())
    finally:
        source_server.stop("immediate")
        store_server.stop("immediate")


def _wal_windows(db, dsn, tmp_path, store_dsn) -> None:
    from pgfresh.arena import dbimpact
    from tests.conftest import write_config

    db.execute(dbimpact.LEDGER_SQL)
    config = cfg.load(write_config(tmp_path, dsn, '[[tables]]\nname = "ledger"\n', store=store_dsn))
    r = dbimpact.ledger_wal(config, dsn, store_dsn, inserts=1200)
    without, with_, share = r["without_pgfresh"], r["with_pgfresh"], r["added_share"]
    assert without["changes"] == with_["changes"] == 1500
    print(f"source WAL per change: {without['bytes_per_change']} without pgfresh, {with_['bytes_per_change']} with: {share:+.4%}")
    assert share is not None and share < dbimpact.WAL_GOAL_SHARE, (without, with_)


def test_store_migrate_finishes_when_run_again_after_a_failed_drop(db, dsn, store, store_dsn, tmp_path):
    from tests.conftest import write_config

    db.execute("create table items (id int primary key, name text, price int)")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 20) g")
    old = write_config(tmp_path, dsn, FACTS)  # the old layout: state in the source
    assert run_cli("sync", "--once", "--config", str(old)).returncode == 0
    rows = db.execute("select count(*) from pgfresh.rows").fetchone()[0]
    # Something on the source refuses the drop (here an event trigger; a lock or a privilege would do).
    db.execute("create function no_drop() returns event_trigger language plpgsql as"
               " $$ begin raise exception 'drops are refused here'; end $$")
    db.execute("create event trigger no_drop on sql_drop execute function no_drop()")
    new = write_config(tmp_path, dsn, FACTS, store=store_dsn)
    failed = run_cli("store", "migrate", "--config", str(new))
    assert failed.returncode == 2, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]  # after the progress lines, the error in one line
    assert "copied and verified" in last and "store migrate` again" in last, failed.stderr
    assert db.execute("select to_regnamespace('pgfresh') is not null").fetchone()[0]
    assert store.execute("select count(*) from pgfresh.rows").fetchone()[0] == rows

    db.execute("drop event trigger no_drop")
    again = run_cli("store", "migrate", "--json", "--config", str(new))
    assert again.returncode == 0, again.stderr
    assert db.execute("select to_regnamespace('pgfresh')").fetchone()[0] is None
    assert store.execute("select count(*) from pgfresh.rows").fetchone()[0] == rows
    assert run_cli("sync", "--once", "--config", str(new)).returncode == 0


def test_oltp_measurement_pins_the_source_and_pgfresh_to_cores_of_their_own(dsn, pg_server):
    """With 4+ cores the source server (and pgbench) and pgfresh get separate halves; with fewer
    nothing is pinned and the result says so. The pinning itself is checked on this machine's first
    two cores, on the real session server's processes, and undone afterwards."""
    import os

    from pgfresh.arena import dbimpact

    assert dbimpact.core_split(range(8))["source_cores"] == [0, 1, 2, 3]
    assert dbimpact.core_split(range(8))["pgfresh_cores"] == [4, 5, 6, 7]
    two = dbimpact.core_split([0, 1])
    assert not two["pinned"] and "no core to itself" in two["note"]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to pin apart")
    pids = dbimpact.server_pids(dsn)
    assert pids and int((pg_server.pgdata / "postmaster.pid").read_text().split()[0]) == pids[0]
    split = {"pinned": True, "source_cores": cores[:1], "pgfresh_cores": cores[1:]}
    with dbimpact.pinned(split, dsn) as moved:
        # The session server is shared: a backend or autovacuum worker may come or go between the two
        # listings, so the count is at least the earlier one and every process still there is pinned.
        assert moved["source_processes"] >= 2 and moved["source_processes"] >= len(pids) - 2
        assert all(_affinity(p) in (None, set(cores[:1])) for p in pids)
        assert os.sched_getaffinity(0) == set(cores[1:])
        with psycopg.connect(dsn) as c:  # a backend started now is forked by the pinned postmaster
            (pid,) = c.execute("select pg_backend_pid()").fetchone()
            assert os.sched_getaffinity(pid) == set(cores[:1])
    assert all(_affinity(p) in (None, set(cores)) for p in dbimpact.server_pids(dsn))
    assert os.sched_getaffinity(0) == set(cores)


def _affinity(pid: int) -> set[int] | None:
    """A process's cores, or None when it has exited meanwhile."""
    import os

    try:
        return os.sched_getaffinity(pid)
    except ProcessLookupError:
        return None


def test_embedded_server_knows_it_is_down_after_a_crash_and_starts_again(tmp_path):
    """`running()` reads postmaster.pid (no `pg_ctl status` per store connection): a server killed
    with -9 leaves that file behind naming a dead process; it reads as down, and start() recovers."""
    import os
    import signal
    import time

    server = EmbeddedServer(tmp_path / "pg")
    try:
        assert not server.running()
        dsn = server.start()
        assert server.running()
        pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        assert (server.pgdata / "postmaster.pid").exists() and not server.running()
        assert server.start() == dsn
        with psycopg.connect(dsn) as c:
            assert c.execute("select 1").fetchone() == (1,)
        server.stop()
        assert not server.running()
    finally:
        server.destroy()
