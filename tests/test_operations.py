"""operations: a lost or invalidated slot, a bound on the WAL a slot may retain, the server going away."""

from __future__ import annotations

import json

import psycopg

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
