"""[[sources]]: several source databases into one store, each with its own slot, publication,
tables and progress; tenants scoped by source unless two sources say they share them."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from pgfresh import config as cfg
from pgfresh import rag, serve
from pgfresh.capture.pgoutput import parse_lsn
from pgfresh.errors import ConfigError
from pgfresh.serve.metrics import Metrics
from tests.conftest import run_cli
from tests.test_store import _gauge

TABLES = """
[[tables]]
source = "a"
name = "items"
tenant = "shop"
document = "{name} costs {price} EUR."

[[tables]]
source = "b"
name = "items"
tenant = "shop"
document = "{name} costs {price} EUR."

[rag]
"""


def _config(tmp_path, a: str, b: str, store: str, extra_b: str = "") -> cfg.Config:
    path = tmp_path / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{store}" }}\n'
                    f'[[sources]]\nname = "a"\ndsn = "{a}"\nsnapshot_chunk_rows = 40\n\n'
                    f'[[sources]]\nname = "b"\ndsn = "{b}"\nsnapshot_chunk_rows = 40\n{extra_b}\n' + TABLES)
    return cfg.load(path)


def test_sources_config_names_tables_and_tenants_by_source(tmp_path):
    config = _config(tmp_path, "dbname=a", "dbname=b", "dbname=s")
    assert [t.name for t in config.tables] == ["a:public.items", "b:public.items"]
    assert [t.relation for t in config.tables] == ["public.items", "public.items"]
    assert [(s.name, s.slot, s.tenant_prefix) for s in config.sources] == [
        ("a", "pgfresh_a", "a:"), ("b", "pgfresh_b", "b:")]
    view = config.for_source("b")
    assert (view.source.name, [t.name for t in view.tables]) == ("b", ["b:public.items"])
    shared = _config(tmp_path, "dbname=a", "dbname=b", "dbname=s", 'tenants = "a"')
    assert [s.tenant_prefix for s in shared.sources] == ["a:", "a:"]
    # The single [source] form is one source with no prefixes.
    single = cfg.parse({"source": {"dsn": "x"}, "tables": [{"name": "items", "tenant": "shop"}]})
    assert ([t.name for t in single.tables], single.source.tenant_prefix, single.source_views()) == (
        ["public.items"], "", [single])
    with pytest.raises(ConfigError) as err:
        cfg.parse({"source": {}, "sources": [{"name": "a", "slot": "s"}, {"name": "a", "slot": "s"}, {}],
                   "tables": [{"name": "t", "source": "c"}, {"name": "u"}]})
    problems = "\n".join(err.value.problems)
    for expected in ("source: use either", "sources[1].name: a is used", "sources[1].slot: s is used",
                     "sources[2].name: every", "tables[0].source: no source named 'c'", "tables[1].source: expected"):
        assert expected in problems, problems


def _setup(conn, label: str, n: int = 120) -> None:
    conn.execute("create table items (id int primary key, shop text not null, name text, price int)")
    conn.execute("insert into items select g, case when g %% 2 = 0 then 'acme' else 'zeta' end,"
                 " %s || ' item ' || g, g from generate_series(1, %s) g", (label, n))


def _source_rows(conn) -> dict:
    return {r[0]: {"id": r[0], "shop": r[1], "name": r[2], "price": r[3]}
            for r in conn.execute("select id, shop, name, price from items")}


def _stored_rows(store, pipeline: str) -> dict:
    return {r[0]["id"]: r[0] for r in store.execute(
        "select row from pgfresh.rows where pipeline = %s and not deleted", (pipeline,))}


def test_two_sources_into_one_store_survive_kill9_and_keep_tenants_apart(db, dsn, dsn2, store, store_dsn, tmp_path):
    src_b = psycopg.connect(dsn2, autocommit=True)
    _setup(db, "alpha")
    _setup(src_b, "beta")
    # The same tenant value ('acme') and the same key in both sources, with a word only these rows have.
    db.execute("update items set name = 'Marrowind kettle' where id = 2")
    src_b.execute("update items set name = 'Marrowind teapot' where id = 2")
    config = _config(tmp_path, dsn, dsn2, store_dsn)
    path = str(config.path)

    stop = threading.Event()
    rng = random.Random(11)

    def writer():  # interleaved writes to both sources while sync is killed
        next_id = {dsn: 1000, dsn2: 1000}
        with psycopg.connect(dsn, autocommit=True) as wa, psycopg.connect(dsn2, autocommit=True) as wb:
            while not stop.is_set():
                conn, key = (wa, dsn) if rng.random() < 0.5 else (wb, dsn2)
                r = rng.random()
                if r < 0.55:
                    conn.execute("update items set price = price + 1 where id = any(%s)",
                                 ([rng.randint(3, 120) for _ in range(3)],))
                elif r < 0.85:
                    conn.execute("insert into items values (%s, %s, 'new item', 1)",
                                 (next_id[key], rng.choice(["acme", "zeta"])))
                    next_id[key] += 1
                else:
                    conn.execute("delete from items where id = %s", (rng.randint(3, 120),))
                time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(4):
            proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", path],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(2.0, 5.0))
            if proc.poll() is not None:
                pytest.fail(f"sync exited early: {proc.stderr.read()}")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finally:
        stop.set()
        t.join()
    result = run_cli("sync", "--once", "--config", path)
    assert result.returncode == 0, result.stderr
    assert "source a: caught up" in result.stdout and "source b: caught up" in result.stdout

    # Both row stores equal their sources, each under its own pipeline (slot).
    assert _stored_rows(store, "pgfresh_a") == _source_rows(db)
    assert _stored_rows(store, "pgfresh_b") == _source_rows(src_b)
    assert store.execute("select distinct pipeline, tbl from pgfresh.rows order by 1").fetchall() == [
        ("pgfresh_a", "a:public.items"), ("pgfresh_b", "b:public.items")]
    # Tenants are scoped by source all the way to the index.
    docs = store.execute("select tbl, pipeline, min(tenant), max(tenant), count(*) from pgfresh.documents"
                         " group by 1, 2 order by 1").fetchall()
    assert docs == [("a:public.items", "pgfresh_a", "a:acme", "a:zeta", len(_source_rows(db))),
                    ("b:public.items", "pgfresh_b", "b:acme", "b:zeta", len(_source_rows(src_b)))]
    # Search spans the sources; a tenant of one source never sees the other's rows of the same tenant value.
    both = {(h.tbl, h.key) for h in rag.run_search(config, "Marrowind", tenant="a:acme", k=10, mode="lexical")}
    assert both == {("a:public.items", "[2]")}
    assert {(h.tbl, h.key) for h in rag.run_search(config, "Marrowind", tenant="b:acme", k=10, mode="lexical")} == {
        ("b:public.items", "[2]")}
    assert rag.run_search(config, "Marrowind", tenant="acme", k=10, mode="lexical") == []
    assert {h.tbl for h in rag.run_search(config, "item", tenant="a:zeta", k=50, mode="lexical")} == {"a:public.items"}

    status = run_cli("status", "--json", "--config", path)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert set(report["sources"]) == {"a", "b"}
    for name in ("a", "b"):
        one = report["sources"][name]
        assert one["slot"]["name"] == f"pgfresh_{name}" and one["slot"]["state"] == "ok"
        assert one["capture"]["tables"][f"{name}:public.items"]["snapshot"]["done"]
    assert set(report["pipelines"]) == {"pgfresh_a", "pgfresh_b"}
    # /metrics: each source's slot, as sync measured it on that source, labelled by the source's name
    text = Metrics(config, serve.Registry()).render()[0].decode()
    for name in ("a", "b"):
        assert 0 <= _gauge(text, "pgfresh_slot_retained_wal_bytes", f'source="{name}"') < 2**30, text
        assert _gauge(text, "pgfresh_changes_total", f'source="{name}",stage="log"') > 0
    samples = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(samples) == len(set(samples))  # no series twice (the stages of two sources used to collide)
    src_b.close()


def test_sources_that_share_tenants_see_each_others_rows(db, dsn, dsn2, store, store_dsn, tmp_path):
    with psycopg.connect(dsn2, autocommit=True) as src_b:
        _setup(db, "alpha", 4)
        _setup(src_b, "beta", 4)
    body = ('store = { dsn = "%s" }\n[[sources]]\nname = "a"\ndsn = "%s"\ntenants = "shop"\n'
            '[[sources]]\nname = "b"\ndsn = "%s"\ntenants = "shop"\n' % (store_dsn, dsn, dsn2))
    path = tmp_path / "pgfresh.toml"
    path.write_text(body + TABLES.replace("[rag]\n", ""))
    assert (r := run_cli("sync", "--once", "--config", str(path))).returncode == 0, r.stderr
    assert store.execute("select tenant, count(*) from pgfresh.rows group by 1 order by 1").fetchall() == [
        ("shop:acme", 4), ("shop:zeta", 4)]
    # One source at a time: sync --source runs one; resync needs to be told which.
    with psycopg.connect(dsn2, autocommit=True) as src_b:
        src_b.execute("update items set price = 99 where id = 1")
    one = run_cli("sync", "--once", "--source", "b", "--config", str(path))
    assert one.returncode == 0 and "caught up" in one.stdout, one.stderr
    assert store.execute("select row->>'price' from pgfresh.rows where tbl = 'b:public.items' and key = '[1]'"
                         ).fetchone() == ("99",)
    refused = run_cli("resync", "--config", str(path))
    assert refused.returncode == 2 and "--source" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    unknown = run_cli("sync", "--once", "--source", "c", "--config", str(path))
    assert unknown.returncode == 2 and "no source named 'c'" in unknown.stderr


# Tables of tenant-scoped state, and the statements that may touch them without a tenant predicate
# because they act on one source row (the write path keyed by table and key), not for a tenant.
TENANT_STATE = ("pgfresh.documents", "pgfresh.facts", "pgfresh.answer_cache ")


def test_every_query_for_a_tenant_names_the_tenant(tmp_path):
    """Search, ask (cache miss, exact hit, similar hit) and the training data of a slice: every statement
    they run on documents, facts and the answer cache names the tenant (in its WHERE, or as the value
    it inserts), so a store distributed by tenant routes each to one shard (docs/SCALE.md)."""
    from pgfresh.capture import sync
    from pgfresh.embedded import EmbeddedServer
    from pgfresh.train import data

    server = EmbeddedServer(tmp_path / "pg", settings={"shared_preload_libraries": "'pg_stat_statements'"})
    try:
        admin = server.start()
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("create database src")
            c.execute("create database store")
        with psycopg.connect(server.dsn("src"), autocommit=True) as src:
            _setup(src, "alpha", 30)
        path = tmp_path / "pgfresh.toml"
        path.write_text(f'store = {{ dsn = "{server.dsn("store")}" }}\n'
                        f'[[sources]]\nname = "a"\ndsn = "{server.dsn("src")}"\n' + TABLES.split("[[tables]]\nsource = \"b\"")[0]
                        + '[[tables.facts]]\nname = "price"\nquestion = "What does {name} cost?"\nanswer = "{price} EUR"\n'
                        + '[tables.gate.train]\nsettle_seconds = 0\n[rag]\n[train]\n')
        config = cfg.load(path)
        sync.run(config, once=True)
        with psycopg.connect(server.dsn("store"), autocommit=True) as store:
            store.execute("create extension pg_stat_statements")
            store.execute("select pg_stat_statements_reset()")
            for mode in ("lexical", "dense", "hybrid"):
                assert rag.run_search(config, "alpha item 4", tenant="a:acme", k=3, mode=mode)
            for question in ("What does alpha item 4 cost?", "What does alpha item 4 cost?",
                             "How much does alpha item 4 cost?"):
                rag.ask(config, question, "a:acme")
            assert data.load_facts(store, "a:acme") and data.load_documents(store, "a:acme")
            statements = [q for (q,) in store.execute(
                "select query from pg_stat_statements where dbid = (select oid from pg_database"
                " where datname = current_database())") if any(t in q for t in TENANT_STATE)]
        for part in ("insert into pgfresh.answer_cache ", "qvec <=>", "from pgfresh.documents d", "from pgfresh.facts"):
            assert any(part in q for q in statements), (part, statements)
        unscoped = [q for q in statements
                    if not (q.lstrip().lower().startswith("insert") and "tenant" in q.split(")", 1)[0])
                    and not any("tenant" in part for part in q.lower().split(" where ")[1:])]
        assert unscoped == []
    finally:
        server.stop("immediate")


def test_a_second_single_source_config_cannot_take_over_a_table_of_another_database(db, dsn, dsn2, store,
                                                                                      store_dsn, tmp_path):
    """Two `[source]` configs into one store, each with its own public.items: the second is refused,
    in one line pointing to [[sources]], before it touches the first one's rows."""
    from tests.conftest import write_config

    with psycopg.connect(dsn2, autocommit=True) as src_b:
        _setup(db, "alpha", 3)
        _setup(src_b, "beta", 3)
    first = tmp_path / "a"
    second = tmp_path / "b"
    first.mkdir(), second.mkdir()
    table = '[[tables]]\nname = "items"\n'
    assert run_cli("sync", "--once", "--config", str(write_config(first, dsn, table, store=store_dsn))).returncode == 0
    path = write_config(second, dsn2, table, store=store_dsn)
    path.write_text(path.read_text().replace("[source]\n", '[source]\nslot = "other"\n'))
    refused = run_cli("sync", "--once", "--config", str(path))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "another source database" in lines[0] and "[[sources]]" in lines[0], refused.stderr
    assert store.execute("select pipeline, count(*) from pgfresh.rows group by 1").fetchall() == [("pgfresh", 3)]


def test_index_workers_starting_at_once_build_the_hnsw_index_once(db, dsn, store, store_dsn, tmp_path):
    """One index worker per source starts at the same moment: both find (or build) the generation's
    HNSW index; two concurrent builds of one index used to deadlock (seen in the kill -9 test)."""
    from pgfresh import db as pgdb
    from pgfresh.capture import sync
    from pgfresh.rag import generations

    _setup(db, "alpha", 300)
    path = tmp_path / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{store_dsn}" }}\n[source]\ndsn = "{dsn}"\n'
                    '[[tables]]\nname = "items"\ntenant = "shop"\n[rag]\n')
    config = cfg.load(path)
    sync.run(config, once=True)
    (gid,) = store.execute("select id from pgfresh.rag_indexes where state = 'active'").fetchone()
    name = generations.hnsw_index_name(gid)
    for _ in range(3):
        store.execute(f"drop index pgfresh.{name}")
        barrier, errors = threading.Barrier(2), []

        def start():
            try:
                with pgdb.connect(store_dsn, "index", autocommit=True) as conn:
                    barrier.wait()
                    generations.ensure(conn, config)
            except Exception as exc:  # collected: the test asserts there were none
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store.execute("select indisvalid from pg_index where indexrelid = %s::regclass",
                             (f"pgfresh.{name}",)).fetchone() == (True,)


def test_hybrid_router_compares_a_row_with_the_slice_position_of_its_own_source(db, dsn, dsn2, store, store_dsn,
                                                                                  tmp_path):
    """A slice spans sources; positions in two sources' streams cannot be compared. Source b's row
    changes first, then source a's; a round trains while only a has been synced, so the slice's
    newest LSN (a's change) is numerically past b's change, which it never learnt. After b syncs,
    hybrid must send the question about b's row to retrieval: the slice's position *in b* is older."""
    from pgfresh.capture import sync
    from pgfresh.train import rounds
    from tests.test_serve import tiny_model

    with psycopg.connect(dsn2, autocommit=True) as src_b:
        _setup(db, "alpha", 4)
        _setup(src_b, "beta", 4)
    model_dir = tiny_model(tmp_path / "tiny")
    table = ('[[tables]]\nsource = "%s"\nname = "items"\ndocument = "{name} costs {price} EUR."\n'
             '[[tables.facts]]\nname = "price"\nquestion = "What does {name} cost?"\nanswer = "{price} EUR"\n'
             '[tables.gate.train]\nsettle_seconds = 0\n')
    path = tmp_path / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{store_dsn}" }}\n'
                    f'[[sources]]\nname = "a"\ndsn = "{dsn}"\n[[sources]]\nname = "b"\ndsn = "{dsn2}"\n'
                    + table % "a" + table % "b"
                    + f'[rag]\n[rag.reader]\nkind = "builtin"\n[train]\nbase_model = "{model_dir}"\nthreads = 1\n'
                      'epochs = 1\nmin_steps = 0\ngate_min_new_accuracy = 0\ngate_max_forgetting = 1\n'
                      'gate_max_stale_rate = 1\n')
    config = cfg.load(path)
    sync.run(config, once=True)
    with psycopg.connect(dsn2, autocommit=True) as src_b:
        src_b.execute("update items set price = 777 where id = 1")
    db.execute("update items set price = 555 where id = 2")
    sync.run(config.for_source("a"), once=True)
    r = rounds.run_round(config, None)
    assert r["status"] == "published", r
    sync.run(config.for_source("b"), once=True)
    (b_lsn,) = store.execute("select lsn::text from pgfresh.rows where tbl = 'b:public.items' and key = '[1]'").fetchone()
    assert parse_lsn(r["lsn"]) > parse_lsn(b_lsn)  # the case: one LSN would say the slice knows b's row
    reg = serve.Registry()
    try:
        stale = serve.answer(config, "What does beta item 1 cost?", None, "hybrid", registry=reg,
                             options=serve.Options(search_mode="lexical"))
        assert stale["sources"][0]["tbl"] == "b:public.items" and stale["sources"][0]["key"] == "[1]"
        assert stale["route"]["taken"] == "rag", stale["route"]
        assert "pgfresh_b" in stale["route"]["reason"] and "777" in stale["sources"][0]["text"]
        # a's row the slice learnt in this round still goes to the slice
        fresh = serve.answer(config, "What does alpha item 2 cost?", None, "hybrid", registry=reg,
                             options=serve.Options(search_mode="lexical"))
        assert fresh["sources"][0]["tbl"] == "a:public.items" and fresh["route"]["taken"] == "slice", fresh["route"]
    finally:
        reg.close()
    version = store.execute("select lsn::text, positions from pgfresh.slice_versions where slice = '_shared'"
                            " and version = %s", (r["version"],)).fetchone()
    assert version[1]["pgfresh_a"] == version[0] and parse_lsn(version[1]["pgfresh_b"]) < parse_lsn(b_lsn)


def test_migration_017_gives_existing_slice_versions_a_position_per_pipeline(store):
    """Versions written before 017 get positions: with one pipeline its LSN; with several, the newest
    LSN per pipeline of the facts their lineage learnt (replayed facts do not count)."""
    from pgfresh import db as pgdb

    def before_017():
        store.execute("alter table pgfresh.slice_versions drop column positions")
        store.execute("delete from pgfresh.migrations where version = 17")

    def version(n, parent, lsn, facts):
        store.execute("insert into pgfresh.slice_versions (slice, version, parent, kind, base_id, path, lsn)"
                      " values ('_shared', %s, %s, 'lora', 'b', '/x', %s)", (n, parent, lsn))
        for fid, role in facts:
            store.execute("insert into pgfresh.fact_training values ('_shared', %s, %s, %s)", (n, fid, role))

    pgdb.migrate(store)
    store.execute("insert into pgfresh.slices (name) values ('_shared')")
    store.execute("insert into pgfresh.tables (pipeline, tbl) values ('pa', 'a:t')")
    before_017()
    version(0, None, "0/500", [])
    pgdb.migrate(store)
    assert store.execute("select positions from pgfresh.slice_versions").fetchone() == ({"pa": "0/500"},)

    before_017()
    store.execute("insert into pgfresh.tables (pipeline, tbl) values ('pb', 'b:t')")
    for fid, tbl, lsn in (("f1", "a:t", "0/100"), ("f2", "b:t", "0/300"), ("f3", "a:t", "0/900"), ("f4", "b:t", "0/950")):
        store.execute("insert into pgfresh.facts (fact_id, tbl, key, kind, template, question, answer, lsn)"
                      " values (%s, %s, '[1]', 'qa', 'p', 'q', 'a', %s)", (fid, tbl, lsn))
    version(1, 0, "0/300", [("f1", "learn"), ("f2", "learn")])
    version(2, 1, "0/900", [("f3", "learn"), ("f4", "replay")])
    pgdb.migrate(store)
    got = dict(store.execute("select version, positions from pgfresh.slice_versions where version > 0"))
    assert got == {1: {"pa": "0/100", "pb": "0/300"}, 2: {"pa": "0/900", "pb": "0/300"}}
