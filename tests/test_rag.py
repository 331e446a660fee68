"""rag: the index follows the source through capture, search is hybrid and tenant-safe, the cache never serves stale rows."""

from __future__ import annotations

import http.server
import json
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from pgvector.psycopg import register_vector

from pgfresh import config as cfg
from pgfresh import rag
from pgfresh.capture import sync
from pgfresh.errors import ConfigError, PgfreshError
from pgfresh.rag import cache, evalset, retrieval
from tests.conftest import run_cli, write_config

INSERT = ("insert into {t} (id, tenant, name, kind, color, material, city, price) values"
          " (%(id)s, %(tenant)s, %(name)s, %(kind)s, %(color)s, %(material)s, %(city)s, %(price)s)")


def setup_products(db, tmp_path, dsn, rows, tenant: bool = False, rag_toml: str = ""):
    db.execute(evalset.TABLE_SQL.format(table="products"))
    with db.cursor() as cur:
        cur.executemany(INSERT.format(t="products"), rows)
    tenant_line = 'tenant = "tenant"\n' if tenant else ""
    path = write_config(tmp_path, dsn, f'[[tables]]\nname = "products"\n{tenant_line}document = "{evalset.DOCUMENT}"\n'
                                       f"\n[rag]\n{rag_toml}")
    return cfg.load(path)


def docs(db) -> dict:
    """Active-generation documents by key."""
    rows = db.execute("select d.key, d.text, d.tenant, d.lsn::text from pgfresh.documents d join pgfresh.rag_indexes i"
                      " on i.id = d.index_id and i.state = 'active'").fetchall()
    return {r[0]: r for r in rows}


def search_keys(db, config, text, tenant=None, k=5, mode="hybrid", **kw) -> list[str]:
    register_vector(db)
    return [h.key for h in rag.search(db, config, text, tenant, k, mode, **kw)]


def test_insert_update_delete_reach_the_index(db, dsn, tmp_path):
    rows = evalset.products(5, seed=3)
    config = setup_products(db, tmp_path, dsn, rows)
    sync.run(config, once=True)
    assert len(docs(db)) == 5
    db.execute(INSERT.format(t="products"), {**rows[0], "id": 100, "name": "Zephyrine", "city": "Reykjavik"})
    sync.run(config, once=True)
    for mode in ("lexical", "hybrid"):
        assert search_keys(db, config, "Where is the Zephyrine made?", mode=mode, k=1, rerank="none") == ["[100]"]
    assert "[100]" in search_keys(db, config, "Where is the Zephyrine made?", mode="dense", k=2)
    assert search_keys(db, config, "Where is the Zephyrine made?", k=1) == ["[100]"]  # the default pipeline
    assert "Reykjavik" in docs(db)["[100]"][1]
    # The stored vector is the embedder's, bit for bit (vectors travel to the store in binary).
    register_vector(db)
    text, stored = db.execute("select text, embedding from pgfresh.documents where key = '[100]'").fetchone()
    expected = retrieval.active_generation(db, config).model.embed([text])[0]
    assert stored.to_numpy().tolist() == expected.astype("float32").tolist()

    db.execute("update products set city = 'Valparaiso', name = 'Quillbrook' where id = 100")
    sync.run(config, once=True)
    text = docs(db)["[100]"][1]
    assert "Valparaiso" in text and "Reykjavik" not in text and "Zephyrine" not in text
    assert "[100]" not in search_keys(db, config, "Zephyrine Reykjavik", mode="lexical", rerank="none")
    assert search_keys(db, config, "Where is the Quillbrook made?", mode="lexical", k=1, rerank="none") == ["[100]"]

    db.execute("delete from products where id = 100")
    sync.run(config, once=True)
    assert "[100]" not in docs(db)
    assert "[100]" not in search_keys(db, config, "Quillbrook Valparaiso", k=10)

    # Through the CLI: --json carries every stage's score, table/key, LSN and commit time.
    db.execute("update products set city = 'Nairobi' where id = 1")
    sync.run(config, once=True)
    out = run_cli("search", "products made in Nairobi", "--json", "--k", "2", "--config", str(config.path))
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert hits[0]["key"] == "[1]" and hits[0]["tbl"] == "public.products"
    assert set(hits[0]["scores"]) >= {"dense", "lexical", "fused"} and hits[0]["commit_time"] and hits[0]["lsn"] != "0/0"
    status = rag.status_counts(db)
    assert status["documents"] == 5 and status["freshness"]["changes"] >= 4 and status["freshness"]["p99_ms"] > 0


def test_hybrid_beats_or_equals_each_mode_and_hnsw_matches_exact_knn(db, dsn, tmp_path):
    rows = evalset.products(50, seed=7)
    config = setup_products(db, tmp_path, dsn, rows)
    sync.run(config, once=True)
    register_vector(db)
    questions = evalset.questions(rows, seed=7)
    hits = {m: 0 for m in ("dense", "lexical", "hybrid")}
    model = retrieval.active_generation(db, config).model
    recall, total = 0, 0
    for q, pid, _ in questions:
        qvec = model.embed([q])[0]
        for mode in hits:
            keys = search_keys(db, config, q, k=5, mode=mode, rerank="none", qvec=qvec)
            hits[mode] += f"[{pid}]" in keys
        ann = search_keys(db, config, q, k=10, mode="dense", rerank="none", qvec=qvec)
        exact = [key for _, key, _ in retrieval.exact_dense(db, config, qvec, None, 10)]
        recall += len(set(ann) & set(exact))
        total += 10
    assert hits["hybrid"] >= hits["dense"] and hits["hybrid"] >= hits["lexical"], hits
    assert hits["hybrid"] >= 0.9 * len(questions), hits
    assert recall / total >= 0.98  # 50 documents: HNSW should find the exact neighbours


def test_chinese_text_is_found_by_bigrams(db, dsn, tmp_path):
    db.execute("create table notes (id int primary key, body text)")
    db.execute("insert into notes values (1, '这款红木桌子非常结实，适合家庭使用'), (2, '不锈钢水壶容量两升'), (3, 'oak table, sturdy')")
    config = cfg.load(write_config(tmp_path, dsn, '[[tables]]\nname = "notes"\n\n[rag]\n'))
    sync.run(config, once=True)
    assert search_keys(db, config, "红木桌子", mode="lexical", k=1) == ["[1]"]
    assert search_keys(db, config, "水壶", mode="lexical", k=1) == ["[2]"]


def test_tenants_never_see_each_other(db, dsn, tmp_path):
    base = evalset.products(20, seed=11)
    rows = []
    for n, t in enumerate(("A", "B", "C")):  # near-identical rows: same names, only price and id differ
        rows += [{**r, "id": r["id"] + 1000 * n, "tenant": t, "price": r["price"] + n} for r in base]
    config = setup_products(db, tmp_path, dsn, rows, tenant=True, rag_toml="[rag.cache]\nsimilarity = 0.9\n")
    sync.run(config, once=True)
    register_vector(db)
    allowed = {d[0] for d in docs(db).values() if d[2] == "A"}
    assert len(allowed) == 20
    rng = random.Random(1)
    questions = [q for q, _, _ in evalset.questions(base, seed=11)]
    for i in range(300):
        q = rng.choice(questions)
        hits = rag.search(db, config, q, "A", rng.choice([1, 5, 20, 60]), rng.choice(retrieval.MODES))
        assert hits and all(h.tenant == "A" and h.key in allowed for h in hits), (q, [(h.tenant, h.key) for h in hits])
    with pytest.raises(retrieval.TenantRequired):
        rag.search(db, config, "oak", None)
    with pytest.raises(retrieval.TenantRequired):
        rag.ask(config, "oak", None)
    out = run_cli("search", "oak", "--config", str(config.path))
    assert out.returncode == 2 and "--tenant" in out.stderr

    # Through the cache: the same question for B after A (exact) and a near-identical one.
    q = f"What is the price of {base[0]['name']}?"
    a = rag.ask(config, q, "A")
    b = rag.ask(config, q, "B")
    b2 = rag.ask(config, q.replace("What is", "What's"), "B")
    a2 = rag.ask(config, q, "A")
    assert (a["cache"], b["cache"], a2["cache"]) == ("miss", "miss", "hit")
    assert {s["tenant"] for s in a["sources"] + a2["sources"]} == {"A"}
    assert {s["tenant"] for s in b["sources"] + b2["sources"]} == {"B"}


def test_cache_hit_then_change_invalidates_and_next_ask_sees_new_value(db, dsn, tmp_path):
    rows = evalset.products(10, seed=5)
    config = setup_products(db, tmp_path, dsn, rows)
    sync.run(config, once=True)
    name = rows[2]["name"]
    q = f"Where is the {name} made?"
    out = run_cli("ask", q, "--json", "--config", str(config.path))
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    assert first["cache"] == "miss" and first["answer"] is None and "no reader" in first["note"]
    assert first["sources"][0]["key"] == "[3]" and rows[2]["city"] in first["sources"][0]["text"]
    again = rag.ask(config, f"where is the {name} made")  # exact after normalisation
    assert again["cache"] == "hit" and again["sources"] == first["sources"]

    db.execute("update products set city = 'Ulaanbaatar' where id = 3")
    sync.run(config, once=True)  # capture appends the change: the trigger drops the entry in that transaction
    assert db.execute("select count(*) from pgfresh.answer_cache").fetchone()[0] == 0
    after = rag.ask(config, q)
    assert after["cache"] == "miss" and "Ulaanbaatar" in after["sources"][0]["text"]
    counts = rag.status_counts(db)["cache"]
    assert counts["invalidations"] == 1 and counts["hits"] == 1 and counts["misses"] == 2

    # An answer built from a row that changed before it could be stored is never cached.
    register_vector(db)
    stale = [("public.products", "[3]", "0/1")]
    assert not cache.store(db, "", "", "anything", None, 1, {"answer": "x"}, stale)
    assert rag.status_counts(db)["cache"]["refused_stale"] == 1


def test_kill9_during_indexing_leaves_each_row_indexed_exactly_once(db, dsn, tmp_path):
    rows = evalset.products(40, seed=9)
    config = setup_products(db, tmp_path, dsn, rows, rag_toml="index_batch_docs = 8\n")
    rng = random.Random(9)
    next_id = 1000
    for round_ in range(3):
        start = _index_position(db)
        proc = subprocess.Popen([sys.executable, "-m", "pgfresh", "sync", "--config", str(config.path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(30):
            op = rng.random()
            if op < 0.5:
                db.execute(INSERT.format(t="products"),
                           {**rng.choice(rows), "id": next_id, "name": f"Item{next_id}"})
                next_id += 1
            elif op < 0.8:
                db.execute("update products set price = price + 1, city = %s where id = (select id from products"
                           " order by random() limit 1)", (rng.choice(evalset.CITIES),))
            else:
                db.execute("delete from products where id = (select id from products order by random() limit 1)")
        # Wait until this process's index worker has admitted changes, then kill it while it applies them.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _index_position(db) <= start:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sync.run(config, once=True)
    source = {f"[{r[0]}]": r for r in db.execute("select id, name, city from products").fetchall()}
    got = db.execute("select key, count(*) from pgfresh.documents d join pgfresh.rag_indexes i on i.id = d.index_id"
                     " and i.state = 'active' group by key").fetchall()
    assert all(n == 1 for _, n in got)
    indexed = docs(db)
    assert set(indexed) == set(source)
    for key, (_, name, city) in source.items():
        assert indexed[key][1].startswith(f"{name} is a") and f"made in {city}." in indexed[key][1]
    current = dict(db.execute("select key, lsn::text from pgfresh.rows where tbl = 'public.products' and not deleted"))
    assert {k: v[3] for k, v in indexed.items()} == current
    assert db.execute("select count(*) from pgfresh.index_queue").fetchone()[0] == 0


def _index_position(db) -> int:
    """How far the index worker has read the change log (0 before it started)."""
    if not db.execute("select to_regclass('pgfresh.consumers') is not null").fetchone()[0]:
        return 0
    row = db.execute("select seq from pgfresh.consumers where name = 'index'").fetchone()
    return row[0] if row else 0


def test_changing_the_embedder_reembeds_in_background_then_switches(db, dsn, tmp_path):
    rows = evalset.products(12, seed=2)
    config = setup_products(db, tmp_path, dsn, rows, rag_toml="index_batch_docs = 5\n")
    sync.run(config, once=True)
    old = retrieval.active_generation(db, config)
    from pgfresh.rag.embed import minilm_path

    text = config.path.read_text().replace("[rag]\n", f'[rag]\nembedder = "minilm-copy"\nembedder_path = "{minilm_path()}"\n')
    config.path.write_text(text)
    config = cfg.load(config.path)
    from pgfresh.rag.index import IndexWorker

    worker = IndexWorker(config, dsn)
    try:
        worker.step()  # one backfill batch: the old generation still serves
        gens = dict(db.execute("select state, id from pgfresh.rag_indexes where state in ('active', 'building')"))
        assert gens == {"active": old.id, "building": gens["building"]}
        assert search_keys(db, config, f"How much does the {rows[0]['name']} cost?", k=1, mode="lexical") == ["[1]"]
        db.execute("update products set city = 'Hobart' where id = 12")  # a change during the re-embedding
        sync.run(config, once=True, workers=[worker])
    finally:
        worker.close()
    new = retrieval.active_generation(db, config)
    assert (new.embedder, new.id) == ("minilm-copy", gens["building"])
    assert len(docs(db)) == 12 and "Hobart" in docs(db)["[12]"][1]
    assert db.execute("select count(*) from pgfresh.documents where index_id = %s", (old.id,)).fetchone()[0] == 0


def test_rag_config_problems_are_all_reported(tmp_path):
    body = ('[source]\ndsn = "x"\n[[tables]]\nname = "t"\n[rag]\nmode = "fuzzy"\ncandidates = 0\nrerank_depth = 500\n'
            'embedder = "nope"\ndense_weight = true\nwhat = 1\n[rag.reader]\nkind = "openai"\n[rag.cache]\nsimilarity = 2\n')
    (tmp_path / "pgfresh.toml").write_text(body)
    with pytest.raises(ConfigError) as err:
        cfg.load(tmp_path / "pgfresh.toml")
    got = {p.split(":")[0] for p in err.value.problems}
    assert got >= {"rag.mode", "rag.candidates", "rag.rerank_depth", "rag.embedder", "rag.dense_weight", "rag.what",
                   "rag.reader.base_url", "rag.reader.model", "rag.cache.similarity"}


def test_ask_modes_of_other_stages_fail_clearly(db, dsn, tmp_path):
    config = cfg.load(write_config(tmp_path, dsn, '[[tables]]\nname = "t"\n\n[rag]\n'))
    with pytest.raises(PgfreshError, match=r"needs a \[train\] section .*or use --mode rag"):
        rag.ask(config, "q", mode="tuned")
    with pytest.raises(PgfreshError, match="unknown ask mode"):
        rag.ask(config, "q", mode="psychic")


def test_truncate_then_insert_in_one_sync_leaves_only_the_new_row(db, dsn, tmp_path):
    db.execute("create table notes (id int primary key, body text)")
    db.execute("insert into notes select g, 'note ' || g from generate_series(1, 5) g")
    config = cfg.load(write_config(tmp_path, dsn, '[[tables]]\nname = "notes"\n\n[rag]\n'))
    sync.run(config, once=True)
    db.execute("update notes set body = 'edited' where id = 2")
    db.execute("truncate notes")
    db.execute("insert into notes values (9, 'after the truncate')")
    sync.run(config, once=True)
    assert list(docs(db)) == ["[9]"]


class _EchoReader(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers with the first document of the prompt."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        first = next(line for line in prompt.splitlines() if line.startswith("[1] "))
        self.server.seen.append((self.path, self.headers.get("Authorization"), body["model"]))
        reply = {"choices": [{"message": {"role": "assistant", "content": first[4:]}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_reader_answers_from_the_documents_and_the_cache_follows_changes(db, dsn, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _EchoReader)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reader = (f'[rag.reader]\nkind = "openai"\nbase_url = "http://127.0.0.1:{server.server_port}/v1"\n'
                  'model = "echo"\napi_key_env = "PGFRESH_TEST_KEY"\n')
        rows = evalset.products(8, seed=4)
        config = setup_products(db, tmp_path, dsn, rows, rag_toml=reader)
        sync.run(config, once=True)
        q = f"Where is the {rows[0]['name']} made?"
        first = rag.ask(config, q, environ={"PGFRESH_TEST_KEY": "sekret"})
        assert first["cache"] == "miss" and f"made in {rows[0]['city']}" in first["answer"]
        assert server.seen == [("/v1/chat/completions", "Bearer sekret", "echo")]
        assert rag.ask(config, q)["cache"] == "hit" and len(server.seen) == 1
        db.execute("update products set city = 'Timbuktu' where id = 1")
        sync.run(config, once=True)
        after = rag.ask(config, q)
        assert after["cache"] == "miss" and "made in Timbuktu" in after["answer"] and len(server.seen) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_hf_directory_reader_generates_with_a_tiny_local_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pgfresh.rag.reader import HFReader, ReaderError

    words = ["<unk>", "<s>", "</s>", "the", "price", "of", "oak", "table", "is", "12", "answer", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    reader = HFReader(tmp_path)
    out = reader.generate("the price of oak table is", max_new_tokens=4)
    assert isinstance(out, str) and set(out.split()) <= set(words)
    assert reader.id == f"hf:{tmp_path.resolve()}"
    with pytest.raises(ReaderError, match="config.json"):
        HFReader(tmp_path / "missing")


def test_rerank_reads_past_the_embedders_window(db, dsn, tmp_path):
    filler = " ".join(f"Returns are accepted within {d} days if the receipt is kept and the box is intact." for d in range(30, 60))
    long = f"Store manual. {filler} The espresso machine with a steam wand is sold at the back counter."
    db.execute("create table notes (id int primary key, body text)")
    db.execute("insert into notes values (1, %s), (2, 'Coffee beans from Brazil, roasted weekly.'),"
               " (3, 'A kitchen blender with five speeds.'), (4, 'Wooden chairs for the dining room.')", (long,))
    config = cfg.load(write_config(tmp_path, dsn, '[[tables]]\nname = "notes"\n\n[rag]\n'))
    sync.run(config, once=True)
    register_vector(db)
    q = "Where is the espresso machine with a steam wand sold?"
    plain = rag.search(db, config, q, None, 4, "dense", rerank="none")
    reranked = rag.search(db, config, q, None, 4, "dense", rerank="embedder")
    whole = next(h for h in reranked if h.key == "[1]")
    assert whole.scores["dense_whole"] > whole.scores["dense"] + 0.1  # the stored vector never saw the last sentence
    assert reranked[0].key == "[1]" and [h.key for h in plain].index("[1]") >= [h.key for h in reranked].index("[1]")


def test_cross_encoder_rerank_is_used_when_configured(db, dsn, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    model_dir = tmp_path / "ce"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "oak", "table", "chair", "red"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(model_dir)
    BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=1)).save_pretrained(model_dir)
    db.execute("create table notes (id int primary key, body text)")
    db.execute("insert into notes values (1, 'oak table'), (2, 'red chair'), (3, 'oak chair')")
    config = cfg.load(write_config(tmp_path, dsn, f'[[tables]]\nname = "notes"\n\n[rag]\nrerank_model = "{model_dir}"\n'))
    sync.run(config, once=True)
    register_vector(db)
    hits = rag.search(db, config, "oak table", None, 3)
    from sentence_transformers import CrossEncoder

    expected = CrossEncoder(str(model_dir), device="cpu").predict([("oak table", h.text) for h in hits])
    assert [h.scores["rerank"] for h in hits] == pytest.approx([float(x) for x in expected], abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_documents_of_a_tenant_table_have_a_tenant_and_name_their_pipeline(db, dsn, tmp_path):
    """A source row without tenant is quarantined, never shared; a tenantless document cannot be stored."""
    import psycopg

    rows = [{**r, "tenant": "A" if r["id"] % 2 else None} for r in evalset.products(6, seed=5)]
    config = setup_products(db, tmp_path, dsn, rows, tenant=True)
    config.path.write_text(config.path.read_text().replace("[source]\n", '[source]\nslot = "shop"\npublication = "shop"\n'))
    config = cfg.load(config.path)
    sync.run(config, once=True)
    documents = docs(db)
    assert sorted(documents) == sorted(f"[{r['id']}]" for r in rows if r["tenant"])
    assert {d[2] for d in documents.values()} == {"A"}
    assert db.execute("select distinct pipeline from pgfresh.documents").fetchall() == [("shop",)]
    quarantined = db.execute("select key from pgfresh.quarantine where path = 'rag' and check_name = 'tenant'"
                             " order by key").fetchall()
    assert quarantined == sorted((f"[{r['id']}]",) for r in rows if not r["tenant"])
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("insert into pgfresh.documents (index_id, tbl, key, tenant, text, tsv, embedder, embedder_version,"
                   " lsn) select id, 'public.products', '[99]', null, 'x', ''::tsvector, embedder, embedder_version,"
                   " '0/0' from pgfresh.rag_indexes where state = 'active'")


def test_question_limits_are_one_line_and_a_long_question_is_cached(db, dsn, tmp_path):
    from pgfresh.rag.question import MAX_QUESTION_CHARS, QuestionError

    rows = evalset.products(5, seed=3)
    config = setup_products(db, tmp_path, dsn, rows)
    sync.run(config, once=True)
    # The longest accepted question, in characters that do not compress (~6 kB of UTF-8): the old
    # B-tree key on the question text refused it ("index row size exceeds btree maximum").
    rng = random.Random(1)
    long_q = f"Where is the {rows[0]['name']} made? " + "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(2000))
    long_q = long_q[:MAX_QUESTION_CHARS]
    assert rag.ask(config, long_q)["cache"] == "miss"
    assert rag.ask(config, long_q)["cache"] == "hit"
    for bad, needle in [("", "empty"), ("   ", "empty"), ("x" * (MAX_QUESTION_CHARS + 1), "at most 2000"),
                        ("price of \udcff", "not valid UTF-8"), ("a\x00b", "NUL")]:
        with pytest.raises(QuestionError, match=needle):
            rag.ask(config, bad)
        with pytest.raises(QuestionError, match=needle):
            rag.run_search(config, bad)
    for k in (0, -1, 1001):
        with pytest.raises(QuestionError, match="k: expected an integer from 1 to 1000"):
            rag.run_search(config, "oak table", k=k)
    assert db.execute("select count(*) from pgfresh.answer_cache").fetchone()[0] == 1  # nothing else was cached
    # Through a real process: an argument that is not UTF-8, and an empty one, are one line and exit 2.
    for arg in (b"price of \xff\xfe", b""):
        out = subprocess.run([sys.executable, "-m", "pgfresh", "ask", arg, "--config", str(config.path)],
                             capture_output=True)
        err = out.stderr.decode("utf-8", "replace")
        assert out.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_lexical_match_is_bounded_by_estimated_rows_and_keeps_rare_words():
    from pgfresh.rag.lexical import match_query, or_query

    freq = {"red": 0.06, "oak": 0.06, "sofa": 0.025, "norvik": 0.05, "cost": 0.9, "the": 0.001}
    words = ["sell", "red", "oak", "sofa", "norvik", "cost"]
    # A small index: every word under lexical_max_df is matched, as or_query does.
    assert match_query(words, freq, 0.2, 1000, 20000) == or_query(words, freq, 0.2)
    # A million documents: the rare word, and the rows holding all the common ones.
    assert match_query(words, freq, 0.2, 1e6, 20000) == "'sell' | ('red' & 'oak' & 'sofa' & 'norvik')"
    assert match_query(["velora", "cost"], freq, 0.2, 1e6, 20000) == "'velora'"
    # Every word common: only the rows holding all of them.
    assert match_query(["red", "oak", "sofa"], freq, 0.2, 1e6, 20000) == "('red' & 'oak' & 'sofa')"


class _HeldEmbedder:
    """Wraps an embedder; its first call waits until released (an embedding that takes a while)."""

    def __init__(self, model):
        self.model, self.entered, self.release, self.calls = model, threading.Event(), threading.Event(), 0

    def embed(self, texts):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(60)
        return self.model.embed(texts)


def test_a_version_admitted_during_embedding_is_applied_after_it(db, dsn, tmp_path):
    from pgfresh.rag.index import IndexWorker

    rows = evalset.products(3, seed=4)
    config = setup_products(db, tmp_path, dsn, rows)
    sync.run(config, once=True)
    worker = IndexWorker(config, dsn)
    held = None
    try:
        worker.step()
        held = worker.active.model = _HeldEmbedder(worker.active.model)
        db.execute("update products set city = 'Hobart' where id = 1")
        sync.run(config, once=True, workers=[])  # capture only
        worker.step()  # admits Hobart; the apply thread starts embedding it and is held there
        assert held.entered.wait(60)
        db.execute("update products set city = 'Perth' where id = 1")
        sync.run(config, once=True, workers=[])
        assert worker.step() > 0  # admits Perth while Hobart is still being embedded
        assert "made in Hobart" not in docs(db)["[1]"][1]
        held.release.set()
        deadline = time.monotonic() + 60
        while worker.step() and time.monotonic() < deadline:
            pass
    finally:
        if held is not None:
            held.release.set()
        worker.close()
    assert "made in Perth." in docs(db)["[1]"][1]
    assert db.execute("select count(*) from pgfresh.index_queue").fetchone()[0] == 0
    current = db.execute("select lsn::text from pgfresh.rows where tbl = 'public.products' and key = '[1]'").fetchone()[0]
    assert docs(db)["[1]"][3] == current


def test_a_question_without_words_matches_nothing_lexically():
    from pgfresh.rag import lexical

    # ":" has no lexeme: the bounded match query used to be "()", a tsquery syntax error (HTTP 500).
    assert lexical.match_query([], {"oak": 0.01}, 0.2, 1000, 5000) == lexical.or_query([], {"oak": 0.01}, 0.2) == ""
