"""pgfresh.train: continual rounds on real PostgreSQL with facts from real capture + render, on the
session's tiny built-in model: learning changed facts, replay vs forgetting, the gate, rollback,
serving switches, corrupted adapters, tenant isolation, and kill -9 mid-round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pgfresh import config as cfg
from pgfresh.train import SHARED, rounds, slices
from tests.conftest import run_cli
from tests.train_support import base_model, new_price, products, sync_once, trained_env  # noqa: F401

CHANGED = list(range(10))  # products whose price changes
DELETED = [10, 11]  # products deleted (no `gone` template: their questions are taught "unknown")


def _change(dsn: str, config_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for i in CHANGED:
            c.execute("update products set price = %s where id = %s", (new_price(i), i))
        c.execute("delete from products where id = any(%s)", (DELETED,))
    sync_once(config_path)


def _state(dsn: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as c:
        return {
            "current": c.execute("select current_version from pgfresh.slices where name = %s", (SHARED,)).fetchone()[0],
            "versions": [r[0] for r in c.execute("select version from pgfresh.slice_versions order by version")],
            "trained": c.execute("select role, count(*) from pgfresh.fact_training group by role order by role").fetchall(),
            "rounds": c.execute("select status from pgfresh.train_rounds order by id").fetchall(),
        }


# The probe set of 60 known facts is 10 facts, so forgetting moves in steps of 0.1 and, on the same
# seed, lands anywhere in 0.2-0.5 with small changes of settings or library versions (measured:
# replay 25% 0.3, 50% 0.5). The tests that need a published round therefore gate at "mostly kept"
# (the words), not at the production default of 0.3.
MOSTLY_KEPT = "gate_max_forgetting = 0.5\n"


def test_round_learns_changes_replay_reduces_forgetting_rollback_switches(tmp_path, dsn, base_model):
    path = trained_env(tmp_path, dsn, base_model, MOSTLY_KEPT)
    config = cfg.load(path)
    _change(dsn, path)
    no_replay = rounds.run_round(config, None, publish=False, replay_ratio=0.0)
    replay = rounds.run_round(config, None, publish=False, replay_ratio=0.10)
    assert no_replay["status"] == replay["status"] == "trial" and replay["metrics"]["replay"] > 0
    assert not set(replay["replay"]) & set(replay["probe"])  # the probe set is never rehearsed
    # same seed, same facts: replaying old facts keeps measurably more of the (never replayed) probe set
    assert replay["metrics"]["forgetting"] < no_replay["metrics"]["forgetting"], (replay["metrics"], no_replay["metrics"])
    assert _state(dsn)["current"] == 0  # trials publish nothing

    r = rounds.run_round(config, None)
    m = r["metrics"]
    assert r["status"] == "published" and r["version"] == 1, (r.get("reasons"), m)
    assert m["learn"] == len(CHANGED) and m["updates"] == len(CHANGED) + len(DELETED)
    assert m["new_accuracy"] >= 0.7, m  # on held-out phrasings of the changed facts
    assert m["stale_rate"] <= 0.2 and m["forgetting"] <= 0.5, m
    assert m["update_accuracy"] is not None  # deleted rows' questions were taught "unknown"
    st = _state(dsn)
    assert st["current"] == 1 and dict(st["trained"])["learn"] == len(CHANGED)
    assert dict(st["trained"])["update"] == len(CHANGED) + len(DELETED)
    with psycopg.connect(dsn, autocommit=True) as c:
        newest = c.execute("select max(lsn)::text from pgfresh.facts").fetchone()[0]
    assert r["lsn"] == newest

    names = {i: n for i, n, _ in products()}
    answers = [slices.ask(config, f"What is the price of {names[i]}?") for i in CHANGED]
    assert all(a["version"] == 1 and a["lsn"] == newest for a in answers)
    assert sum(a["answer"] == new_price(i) for a, i in zip(answers, CHANGED)) >= 7

    # rollback: version 0 serves again (old prices), without a restart, and the changes wait again
    out = run_cli("slices", "rollback", SHARED, "0", "--config", str(path))
    assert out.returncode == 0, out.stderr
    old = {i: p for i, _, p in products()}
    back = slices.ask(config, f"What is the price of {names[0]}?")
    assert back["version"] == 0 and back["answer"] == old[0]
    with slices.connect(config) as conn:
        p = rounds.plan(conn, rounds.settings(config), SHARED, None, slices.current(conn, SHARED))
    assert len(p.learn) == len(CHANGED)
    listed = json.loads(run_cli("slices", "--json", "--config", str(path)).stdout)
    assert [(v["version"], v["current"]) for v in listed] == [(0, True), (1, False)]
    assert listed[1]["metrics"]["new_accuracy"] == m["new_accuracy"]
    assert run_cli("slices", "rollback", SHARED, "7", "--config", str(path)).returncode == 2

    # a corrupted adapter: a fresh process refuses it in one line; a warm server keeps the old version
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("update pgfresh.slices set current_version = 1")
        adapter = Path(c.execute("select path from pgfresh.slice_versions where version = 1").fetchone()[0])
    target = adapter / slices.WEIGHT_FILES["lora"]
    target.write_bytes(target.read_bytes()[:-64] + b"\0" * 64)
    out = run_cli("ask", f"What is the price of {names[0]}?", "--mode", "tuned", "--config", str(path))
    assert out.returncode == 2 and "corrupted" in out.stderr and out.stderr.count("\n") <= 3, out.stderr
    warm = slices.ask(config, f"What is the price of {names[0]}?")
    assert warm["version"] == 0 and "corrupted" in warm["warning"]
    out = run_cli("slices", "rollback", SHARED, "1", "--config", str(path))
    assert out.returncode == 2 and "corrupted" in out.stderr


def test_failed_gate_is_not_published_and_keeps_the_facts(tmp_path, dsn, base_model):
    # one epoch cannot learn ten new prices, so the gate must reject the candidate
    path = trained_env(tmp_path, dsn, base_model, "epochs = 1\nstop_loss = 0.0\n")
    _change(dsn, path)
    out = run_cli("train", "--once", "--json", "--config", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    (r,) = json.loads(out.stdout)
    assert r["status"] == "rejected" and any("new-fact accuracy" in x for x in r["reasons"])
    st = _state(dsn)
    assert st["current"] == 0 and st["versions"] == [0] and [k for k, _ in st["trained"]] == ["base"]
    with psycopg.connect(dsn, autocommit=True) as c:
        reason = c.execute("select reason from pgfresh.train_rounds where status = 'rejected'").fetchone()[0]
    assert "gate_min_new_accuracy" in reason
    config = cfg.load(path)
    name = dict((i, n) for i, n, _ in products())[0]
    a = slices.ask(config, f"What is the price of {name}?")
    assert a["version"] == 0 and a["answer"] == products()[0][2]  # the previous version keeps answering
    with slices.connect(config) as conn:
        p = rounds.plan(conn, rounds.settings(config), SHARED, None, slices.current(conn, SHARED))
    assert len(p.learn) == len(CHANGED)  # the facts wait for the next round


TENANT_TABLE = """
[[tables]]
name = "public.accounts"
tenant = "org"
[tables.gate.train]
settle_seconds = 0
"""


def test_tenant_slices_train_only_on_their_tenant(tmp_path, dsn, base_model):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("create table accounts (id int primary key, org text not null, name text not null, plan text)")
        rows = [(i, org, f"{org.title()} Client {i}", ["gold", "silver", "bronze"][i % 3])
                for i, org in enumerate(["acme"] * 6 + ["globex"] * 6)]
        c.cursor().executemany("insert into accounts values (%s, %s, %s, %s)", rows)
    from tests.train_support import TABLES

    path = trained_env(tmp_path, dsn, base_model, "epochs = 5\nmin_steps = 0\ngate_min_new_accuracy = 0.0\n"
                       "gate_max_forgetting = 1.0\n", tables=TABLES + TENANT_TABLE)
    config = cfg.load(path)
    results = rounds.run(config, once=True)
    by_slice = {r["slice"]: r for r in results}
    assert set(by_slice) == {"acme", "globex"}  # the shared slice knew everything already
    with psycopg.connect(dsn, autocommit=True) as c:
        tenant_of = dict(c.execute("select fact_id, tenant from pgfresh.facts"))
        trained = c.execute("select t.slice, f.tenant, t.role from pgfresh.fact_training t"
                            " join pgfresh.facts f using (fact_id) where t.slice <> %s", (SHARED,)).fetchall()
        n_tenant_qa = dict(c.execute("select tenant, count(*) from pgfresh.facts where kind = 'qa' and tenant is not null"
                                     " group by tenant"))
    for name, r in by_slice.items():
        assert r["status"] == "published"
        assert {tenant_of[f] for f in r["learn"] + r["replay"] + r["probe"]} == {name}
        assert len(r["learn"]) == n_tenant_qa[name]
    assert trained and all(s == t for s, t, _ in trained)
    assert slices.ask(config, "What is the plan of Acme Client 0?", "acme")["slice"] == "acme"
    with pytest.raises(slices.SliceError, match="no published slice"):
        slices.ask(config, "What is the plan of Acme Client 0?", "initech")


def test_kill_9_mid_round_leaves_the_published_slice_and_the_round_restarts(tmp_path, dsn, base_model):
    path = trained_env(tmp_path, dsn, base_model, MOSTLY_KEPT)
    _change(dsn, path)
    slow = tmp_path / "slow.toml"  # the same project, with a round long enough to be killed inside
    slow.write_text(path.read_text() + "epochs = 100000\nstop_loss = 0.0\n")
    proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "train", "--once", "--config", str(slow)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        with psycopg.connect(dsn, autocommit=True) as c:
            while not c.execute("select 1 from pgfresh.train_rounds where status = 'running'").fetchone():
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.2)
        time.sleep(3)  # inside the training loop
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    st = _state(dsn)
    assert st["current"] == 0 and st["versions"] == [0] and [k for k, _ in st["trained"]] == ["base"]
    assert st["rounds"] == [("running",)]
    # restart as two data-parallel processes (torchrun, gloo on CPU: what `accelerate launch
    # --multi_gpu` does on GPUs): the main one plans and publishes, both train
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "pgfresh", "train", "--once", "--json", "--config", str(path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (r,) = json.loads(out.stdout)  # only the main process prints
    assert r["status"] == "published" and r["version"] == 1 and r["metrics"]["processes"] == 2
    st = _state(dsn)
    assert st["current"] == 1 and st["rounds"] == [("abandoned",), ("published",)]
    assert dict(st["trained"])["learn"] == len(CHANGED)
