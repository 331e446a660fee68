"""operations: a lost or invalidated slot, a bound on the WAL a slot may retain, the server going away."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest

from pgfresh.embedded import EmbeddedServer
from tests.conftest import run_cli, write_config
from tests.test_capture import diff_count

ITEMS_TOML = """
[[tables]]
name = "items"

[[tables.facts]]
name = "price"
question = "What is the price of {name}?"
answer = "{price}"
gone = "{name} is no longer available."

[rag]
"""


def _one_line_error(result, *needles) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _assert_downstream_equals_source(db) -> None:
    """Row store, documents and facts all describe exactly the source's live rows."""
    assert diff_count(db, "items") == 0
    source = {f"[{i}]": str(p) for i, p in db.execute("select id, price from items")}
    docs = {k for (k,) in db.execute(
        "select d.key from pgfresh.documents d join pgfresh.rag_indexes i on i.id = d.index_id and i.state = 'active'"
        " where d.tbl = 'public.items'")}
    assert docs == set(source)
    facts = dict(db.execute("select key, answer from pgfresh.facts where tbl = 'public.items' and status = 'active'"
                            " and kind = 'qa'").fetchall())
    assert facts == source


def test_dropped_slot_sync_refuses_and_resync_reconciles(db, dsn, tmp_path):
    db.execute("create table items (id int primary key, name text, price numeric(10,2))")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 300) g")
    path = write_config(tmp_path, dsn, ITEMS_TOML)
    first = run_cli("sync", "--once", "--config", str(path))
    assert first.returncode == 0, first.stderr
    _assert_downstream_equals_source(db)

    # The slot is dropped behind pgfresh's back; the source changes meanwhile.
    db.execute("select pg_drop_replication_slot('pgfresh')")
    db.execute("delete from items where id % 6 = 0")  # 50 rows
    db.execute("update items set price = price + 1000 where id % 10 = 1")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(301, 320) g")

    refused = run_cli("sync", "--once", "--config", str(path))
    _one_line_error(refused, "replication slot pgfresh", "pgfresh resync")
    # Nothing was re-created behind the user's back either.
    assert db.execute("select count(*) from pg_replication_slots where database = current_database()").fetchone()[0] == 0
    status = run_cli("status", "--json", "--config", str(path))
    assert status.returncode == 0, status.stderr
    slot = json.loads(status.stdout)["slot"]
    assert slot["exists"] is False and slot["state"] == "missing"
    assert any("pgfresh resync" in w for w in slot["warnings"])
    human = run_cli("status", "--config", str(path))
    assert human.returncode == 0 and "pgfresh resync" in human.stdout, human.stdout

    resync = run_cli("resync", "--config", str(path))
    assert resync.returncode == 0, resync.stderr
    assert "50 rows deleted" in resync.stdout, resync.stdout
    _assert_downstream_equals_source(db)
    gone = db.execute("select count(distinct key) from pgfresh.facts where kind = 'gone' and status = 'active'").fetchone()[0]
    assert gone == 50
    assert db.execute("select count(*) from pgfresh.rows where deleted").fetchone()[0] == 50

    # Capture goes on from the new slot as usual.
    db.execute("delete from items where id = 1")
    db.execute("update items set price = 7 where id = 2")
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
    _assert_downstream_equals_source(db)
    status = json.loads(run_cli("status", "--json", "--config", str(path)).stdout)
    assert status["slot"]["state"] == "ok" and not any("resync" in w for w in status["slot"]["warnings"])


# -- the server goes away ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of this module's own, which its tests stop, restart and reconfigure."""
    server = EmbeddedServer(tmp_path_factory.mktemp("ops") / "data", settings={"logical_decoding_work_mem": "'64kB'"})
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def own_dsn(own_server):
    name = "o_" + uuid.uuid4().hex[:12]
    with psycopg.connect(own_server.dsn(), autocommit=True) as c:
        c.execute(f'create database "{name}"')
    yield own_server.dsn(name)
    own_server.start()
    with psycopg.connect(own_server.dsn(), autocommit=True) as c:
        c.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
                  (name,))
        for (slot,) in c.execute("select slot_name from pg_replication_slots where database = %s", (name,)).fetchall():
            c.execute("select pg_drop_replication_slot(%s)", (slot,))
        c.execute(f'drop database if exists "{name}" with (force)')


def _writer(dsn: str, stop: threading.Event, counts: dict, first_id: int) -> None:
    """Updates, inserts and deletes until stopped, through every restart (it reconnects too)."""
    rng = random.Random(11)
    next_id = first_id
    while not stop.is_set():
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as w:
                # An insert whose commit the restart hid from us may have landed: go on after it.
                next_id = max(next_id, w.execute("select coalesce(max(id), 0) + 1 from acct").fetchone()[0])
                while not stop.is_set():
                    r = rng.random()
                    if r < 0.6:
                        w.execute("update acct set v = v + 1 where id = any(%s)",
                                  ([rng.randint(1, next_id - 1) for _ in range(3)],))
                    elif r < 0.9:
                        w.execute("insert into acct (id) values (%s)", (next_id,))
                        next_id += 1
                    else:
                        w.execute("delete from acct where id = %s", (rng.randint(1, next_id - 1),))
                    counts["writes"] += 1
                    time.sleep(0.003)
        except psycopg.OperationalError:
            counts["writer_errors"] += 1
            stop.wait(0.2)


def _wait_for_heartbeat(dsn: str, proc, seconds: float = 120) -> None:
    """Until the `pgfresh sync` process `proc` has written its heartbeat (it is connected and running)."""
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            if c.execute("select to_regclass('pgfresh.workers') is not null").fetchone()[0] and c.execute(
                    "select 1 from pgfresh.workers where name = 'capture' and pid = %s", (proc.pid,)).fetchone():
                return
            time.sleep(0.2)
    pytest.fail("pgfresh sync wrote no heartbeat")


def _reconnects(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("select reconnects from pgfresh.workers where name = 'capture'").fetchone()
    return row[0] if row else 0


def _wait_for_reconnect(dsn: str, proc, before: int, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if _reconnects(dsn) > before:
                return
        except psycopg.OperationalError:  # the server is still starting
            pass
        time.sleep(0.2)
    pytest.fail("pgfresh sync did not reconnect")


def test_sync_survives_server_restarts_under_a_live_writer(own_server, own_dsn, tmp_path):
    with psycopg.connect(own_dsn, autocommit=True) as db:
        db.execute("create table acct (id int primary key, v int not null default 1, note text default 'n')")
        db.execute("insert into acct (id) select generate_series(1, 1000)")
    body = ('[[tables]]\nname = "acct"\n\n[[tables.facts]]\nname = "v"\nquestion = "What is v of {id}?"\n'
            'answer = "{v}"\n\n[rag]\n')  # both downstream workers, each with connections of its own
    path = write_config(tmp_path, own_dsn, body)
    first = run_cli("sync", "--once", "--config", str(path))
    assert first.returncode == 0, first.stderr
    stop, counts = threading.Event(), {"writes": 0, "writer_errors": 0}
    writer = threading.Thread(target=_writer, args=(own_dsn, stop, counts, 1001))
    writer.start()
    proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_heartbeat(own_dsn, proc)  # a sync that has not connected yet fails at once, by design
        for mode in ("fast", "immediate", "fast", "immediate"):
            time.sleep(2.5)
            before = _reconnects(own_dsn)
            own_server.stop(mode)
            time.sleep(1.0)
            own_server.start()
            _wait_for_reconnect(own_dsn, proc, before)  # each restart an outage of its own
        time.sleep(3)
    finally:
        stop.set()
        writer.join()
    time.sleep(2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert counts["writes"] > 200 and counts["writer_errors"] >= 4
    last = run_cli("sync", "--once", "--config", str(path))
    assert last.returncode == 0, last.stderr
    with psycopg.connect(own_dsn, autocommit=True) as db:
        assert diff_count(db, "acct") == 0
        # Exactly once: no row counts more applied changes than its source version.
        over = db.execute("select count(*) from pgfresh.rows r join acct a on r.key = json_build_array(a.id)::text"
                          " where r.versions > a.v").fetchone()[0]
        assert over == 0
        born = db.execute("select count(*) from pgfresh.rows r join acct a on r.key = json_build_array(a.id)::text"
                          " where a.id > 1000 and r.versions <> a.v").fetchone()[0]
        assert born == 0  # rows the stream alone built: exactly their source version
        facts = dict(db.execute("select key, answer from pgfresh.facts where status = 'active' and kind = 'qa'").fetchall())
        assert facts == {f"[{i}]": str(v) for i, v in db.execute("select id, v from acct")}
        docs = dict(db.execute("select d.key, d.text from pgfresh.documents d join pgfresh.rag_indexes i"
                               " on i.id = d.index_id and i.state = 'active'").fetchall())
        assert set(docs) == set(facts)
        stale = [i for i, v in db.execute("select id, v from acct") if f"v: {v}" not in docs[f"[{i}]"].splitlines()]
        assert not stale, stale[:5]
    report = json.loads(run_cli("status", "--json", "--config", str(path)).stdout)
    capture = report["capture"]["workers"]["capture"]
    assert capture["reconnects"] == 4, capture
    assert capture["last_error"], capture


def test_sync_gives_up_with_one_line_after_reconnect_give_up_seconds(own_server, own_dsn, tmp_path):
    with psycopg.connect(own_dsn, autocommit=True) as db:
        db.execute("create table t (id int primary key)")
    path = write_config(tmp_path, own_dsn, '[[tables]]\nname = "t"\n')
    path.write_text(path.read_text().replace("[source]\n", "[source]\nreconnect_give_up_seconds = 4\n"))
    proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_heartbeat(own_dsn, proc)
        own_server.stop("fast")
        _, err = proc.communicate(timeout=120)
    finally:
        own_server.start()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "source.reconnect_give_up_seconds = 4" in errors[0] and "resumes from the stored position" in errors[0]


def test_invalidated_slot_is_reported_refused_and_resynced(own_server, own_dsn, tmp_path):
    with psycopg.connect(own_dsn, autocommit=True) as db:
        db.execute("create table items (id int primary key, name text, price numeric(10,2))")
        db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 100) g")
        path = write_config(tmp_path, own_dsn, ITEMS_TOML)
        assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
        db.execute("delete from items where id <= 10")
        # pgfresh is stopped; the server removes the WAL its slot needs (1 MB bound, 3 segments written).
        db.execute("alter system set max_slot_wal_keep_size = '1MB'")
        db.execute("select pg_reload_conf()")
        try:
            for _ in range(3):
                db.execute("create temp table if not exists filler (x text)")
                db.execute("insert into filler select repeat('x', 100) from generate_series(1, 1000)")
                db.execute("select pg_switch_wal()")
            db.execute("checkpoint")
            state = db.execute("select wal_status, invalidation_reason from pg_replication_slots"
                               " where database = current_database()").fetchone()
            assert state == ("lost", "wal_removed"), state
            refused = run_cli("sync", "--once", "--config", str(path))
            _one_line_error(refused, "replication slot pgfresh was invalidated (wal_removed)", "pgfresh resync")
            slot = json.loads(run_cli("status", "--json", "--config", str(path)).stdout)["slot"]
            assert slot["state"] == "invalidated" and slot["invalidation_reason"] == "wal_removed"
            assert any("pgfresh resync" in w for w in slot["warnings"])
        finally:
            db.execute("alter system reset max_slot_wal_keep_size")
            db.execute("select pg_reload_conf()")
        resync = run_cli("resync", "--config", str(path))
        assert resync.returncode == 0, resync.stderr
        assert "10 rows deleted" in resync.stdout, resync.stdout
        _assert_downstream_equals_source(db)


def test_max_slot_wal_keep_size_mb_is_validated_and_enforced(db, dsn, tmp_path):
    db.execute("create table t (id int primary key)")
    bad = write_config(tmp_path, dsn, '[[tables]]\nname = "t"\n')
    bad.write_text(bad.read_text().replace("[source]\n", "[source]\nmax_slot_wal_keep_size_mb = -5\n"))
    _one_line_error(run_cli("sync", "--once", "--config", str(bad)), "source.max_slot_wal_keep_size_mb",
                    "an integer >= 0")
    # The session server bounds slot WAL to 4 GB: a config asking for at most 1 GB is refused.
    strict = write_config(tmp_path, dsn, '[[tables]]\nname = "t"\n')
    strict.write_text(strict.read_text().replace("[source]\n", "[source]\nmax_slot_wal_keep_size_mb = 1024\n"))
    _one_line_error(run_cli("sync", "--once", "--config", str(strict)), "max_slot_wal_keep_size is 4096 MB",
                    "source.max_slot_wal_keep_size_mb = 1024", "ALTER SYSTEM SET max_slot_wal_keep_size = '1024MB'")
    assert db.execute("select count(*) from pg_replication_slots where database = current_database()").fetchone()[0] == 0
    slot = json.loads(run_cli("status", "--json", "--config", str(strict)).stdout)["slot"]
    assert slot["max_slot_wal_keep_size_mb"] == 4096
    assert any("more than source.max_slot_wal_keep_size_mb = 1024" in w for w in slot["warnings"])
    ok = write_config(tmp_path, dsn, '[[tables]]\nname = "t"\n')
    ok.write_text(ok.read_text().replace("[source]\n", "[source]\nmax_slot_wal_keep_size_mb = 8192\n"))
    assert run_cli("sync", "--once", "--config", str(ok)).returncode == 0


def test_unlimited_max_slot_wal_keep_size_is_warned_about(own_server, own_dsn, tmp_path):
    with psycopg.connect(own_dsn, autocommit=True) as db:
        db.execute("create table t (id int primary key)")
        db.execute("alter system set max_slot_wal_keep_size = -1")
        db.execute("select pg_reload_conf()")
        try:
            path = tmp_path / "pgfresh.toml"
            init = run_cli("init", "--dsn", own_dsn, "--config", str(path))
            assert init.returncode == 0 and "max_slot_wal_keep_size is unlimited" in init.stderr, init.stderr
            sync_run = run_cli("sync", "--once", "--config", str(path))
            assert sync_run.returncode == 0 and "max_slot_wal_keep_size is unlimited" in sync_run.stderr
            slot = json.loads(run_cli("status", "--json", "--config", str(path)).stdout)["slot"]
            assert slot["max_slot_wal_keep_size_mb"] == -1
            assert any("unlimited" in w for w in slot["warnings"])
        finally:
            db.execute("alter system reset max_slot_wal_keep_size")
            db.execute("select pg_reload_conf()")
