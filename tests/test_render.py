"""render: documents and facts, deterministic; supersession, PII and render errors through capture."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pgfresh import config as cfg
from pgfresh.capture.change import Change
from pgfresh.config import TableConfig
from pgfresh.render import (RenderError, fact_templates, render_document, render_facts, render_gone,
                            template_fields)
from pgfresh.render.paraphrase import rewrites
from tests.conftest import write_config
from tests.test_gate import TRAIN_ONLY, outcomes, sync_once

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
PRODUCTS = {"name": "public.products", "facts": [
    {"name": "price", "question": "What is the price of {name}?", "answer": "{price}",
     "gone": "{name} is no longer available."},
    {"name": "stock", "question": ["How many {name} are in stock?", "{name}: how many left?"],
     "paraphrases": ["Is {name} in stock, and how many?"], "answer": "{stock} in stock"},
]}


def table(**kw) -> TableConfig:
    raw = {"source": {"dsn": "host=nowhere"}, "tables": [{**PRODUCTS, **kw}]}
    return cfg.parse(raw).tables[0]


def change(row: dict, key=(1,), op: str = "update", lsn: int = 0x1000) -> Change:
    return Change("public.products", op, list(key), row, lsn, T0, tenant="acme", seq=7)


def test_default_document_and_template_document():
    row = {"id": 1, "name": "Blue mug", "price": "12.50", "tags": ["a", "b"], "note": None, "ok": True}
    assert render_document(TableConfig(name="public.products"), row) == (
        'products\nid: 1\nok: true\nname: Blue mug\ntags: ["a", "b"]\nprice: 12.50')  # jsonb's column order
    assert render_document(TableConfig(name="shop.products"), {"id": 1}) == "shop.products\nid: 1"
    t = TableConfig(name="public.products", document="{name} costs {price:.2f} EUR.{note}")
    assert render_document(t, row) == "Blue mug costs 12.50 EUR."  # numeric text formats as a number
    with pytest.raises(RenderError, match="not a number"):
        render_document(t, {**row, "price": "n/a"})
    with pytest.raises(RenderError, match="no column 'name'"):
        render_document(t, {"price": 1})


def test_templates_read_columns_and_nothing_else():
    assert template_fields("{name} costs {price:.2f}") == ("name", "price")
    for bad in ["{name.__class__}", "{tags[0]}", "{0}", "{}", "{name!r}", "{price:{width}}"]:
        with pytest.raises(ValueError):
            template_fields(bad)


def test_facts_are_deterministic_with_paraphrases_and_lineage():
    t = table()
    row = {"id": 1, "name": "Blue mug", "price": "12.50", "stock": 4}
    facts = render_facts(t, change(row))
    assert facts == render_facts(t, change(dict(reversed(list(row.items())))))  # same row, same facts
    assert [(f.kind, f.template) for f in facts] == [("statement", "document"), ("qa", "price"), ("qa", "stock")]
    price = facts[1]
    assert (price.question, price.answer, price.tenant, price.lsn, price.commit_time) == (
        "What is the price of Blue mug?", "12.50", "acme", 0x1000, T0)
    assert {"Tell me the price of Blue mug.", "What's the price of Blue mug?", "Blue mug: what is its price?",
            "Could you tell me the price of Blue mug?"} <= set(price.paraphrases)
    stock = facts[2]
    assert stock.paraphrases[:2] == ("Blue mug: how many left?", "Is Blue mug in stock, and how many?")
    for f in facts[1:]:
        assert len(set(f.paraphrases)) == len(f.paraphrases) >= 3 and f.question not in f.paraphrases
    other = render_facts(t, change(row, key=(2,)))
    assert not {f.fact_id for f in facts} & {f.fact_id for f in other}
    # A null value states nothing: no stock fact rather than "None in stock".
    assert [f.template for f in render_facts(t, change({**row, "stock": None}))] == ["document", "price"]
    gone = render_gone(t, change(None, op="delete"), row)
    assert [(f.kind, f.template, f.answer) for f in gone] == [("gone", "price", "Blue mug is no longer available.")]


def test_every_question_shape_gets_at_least_three_rewrites():
    for q in ["What is the price of {name}?", "What are the opening hours of {store}?", "How much does {name} cost?",
              "How many {unit} does {name} have?", "Where is {store}?", "Is {name} vegan?", "Name the CEO of {co}.",
              "{name}?"]:
        out = rewrites(q)
        assert len(out) >= 3 and q not in out and len(set(out)) == len(out), (q, out)
    assert rewrites("What is the price of {name}?")[:3] == [
        "What's the price of {name}?", "Tell me the price of {name}.", "Could you tell me the price of {name}?"]


def test_default_facts_ask_one_question_per_column():
    plain = TableConfig(name="public.stores", key=["code"])
    row = {"code": "B1", "store_id": 9, "name": "Berlin Mitte", "opening_hours": "9-18", "city": "Berlin"}
    templates = fact_templates(plain, row)
    assert [t.name for t in templates] == ["column:city", "column:opening_hours"]
    facts = render_facts(plain, Change("public.stores", "insert", ["B1"], row, 1, T0))
    assert facts[2].question == "What is the opening hours of Berlin Mitte?" and facts[2].answer == "9-18"
    unnamed = render_facts(plain, Change("public.stores", "insert", ["B1"], {"code": "B1", "city": "Rome"}, 1, T0))
    assert unnamed[1].question == "What is the city of stores B1?"


def test_facts_empty_list_makes_a_documents_only_table():
    """`facts = []` (free-text notes): no questions at all; before, an empty list meant the per-column
    defaults, so the shop's support notes fed rounds "What is the created at of ...?" facts."""
    from pgfresh import config as cfg

    config = cfg.parse({"source": {"dsn": "postgresql://x"},
                        "tables": [{"name": "notes", "document": "{body}", "facts": []}, {"name": "stores"}]})
    notes, stores = config.tables
    row = {"id": 1, "body": "Customer asked about delivery", "created_at": "2026-01-01"}
    assert notes.facts == [] and fact_templates(notes, row) == ()
    assert [f.kind for f in render_facts(notes, Change("public.notes", "insert", [1], row, 1, T0))
            if f.kind == "qa"] == []
    assert [t.name for t in fact_templates(stores, row)] == ["column:body", "column:created_at"]  # no key: defaults


# --- through capture -----------------------------------------------------------------------------

def _products_config(tmp_path, dsn, extra: str = "", tenant: str | None = None) -> object:
    return write_config(tmp_path, dsn, TRAIN_ONLY + """
[[tables]]
name = "products"
""" + (f'tenant = "{tenant}"\n' if tenant else "") + """[tables.gate.train]
settle_seconds = 0
[[tables.facts]]
name = "price"
question = "What is the price of {name}?"
answer = "{price} EUR"
gone = "{name} is no longer available."
""" + extra)


def _facts(db, key: str = "[1]") -> list[tuple]:
    return db.execute("select fact_id, kind, template, answer, status, superseded_by, lsn::text from pgfresh.facts"
                      " where key = %s order by created_at, fact_id", (key,)).fetchall()


def test_price_change_supersedes_old_facts_and_delete_leaves_gone_fact(db, dsn, tmp_path):
    db.execute("create table products (id int primary key, name text, price numeric)")
    path = _products_config(tmp_path, dsn)
    db.execute("insert into products values (1, 'Blue mug', 12.50), (2, 'Red mug', 9)")
    sync_once(path)
    old = {f[2]: f for f in _facts(db) if f[4] == "active"}
    assert old["price"][3] == "12.50 EUR"

    db.execute("update products set price = 14 where id = 1")
    sync_once(path)
    facts = _facts(db)
    active = {f[2]: f for f in facts if f[4] == "active"}
    assert active["price"][3] == "14 EUR"
    superseded = {f[0]: f for f in facts if f[4] == "superseded"}
    assert superseded[old["price"][0]][5] == active["price"][0]  # superseded_by the new price fact
    assert superseded[old["document"][0]][5] == active["document"][0]
    assert active["price"][6] != old["price"][6]  # lineage: the new version's LSN
    assert len(_facts(db, "[2]")) == 2 and all(f[4] == "active" for f in _facts(db, "[2]"))

    db.execute("update products set price = 12.50 where id = 1")  # back to the old price: no second copy
    sync_once(path)
    facts = _facts(db)
    assert len(facts) == 4 and {f[0] for f in facts if f[4] == "active"} == {old["price"][0], old["document"][0]}

    db.execute("delete from products where id = 1")
    sync_once(path)
    active = [(f[1], f[2], f[3]) for f in _facts(db) if f[4] == "active"]
    assert active == [("gone", "price", "Blue mug is no longer available.")]
    db.execute("insert into products values (1, 'Blue mug', 15)")
    sync_once(path)
    assert sorted((f[1], f[3]) for f in _facts(db) if f[4] == "active") == [("qa", "15 EUR"), ("statement", "")]


def test_row_that_breaks_rendering_is_quarantined_and_the_stream_goes_on(db, dsn, tmp_path):
    db.execute("create table products (id int primary key, name text, price text)")
    path = _products_config(tmp_path, dsn)
    text = path.read_text().replace('name = "products"\n', 'name = "products"\ndocument = "{name}: {price:.2f} EUR"\n')
    path.write_text(text)
    db.execute("insert into products values (1, 'Blue mug', '12.5'), (2, 'Red mug', 'ask us'), (3, 'Tea', '3')")
    sync_once(path)
    got = {k: log[-1][1:] for k, log in outcomes(db, "public.products").items()}
    assert got == {"[1]": ("accepted", None), "[2]": ("quarantined", "render"), "[3]": ("accepted", None)}
    reason = db.execute("select reason from pgfresh.quarantine where key = '[2]'").fetchone()[0]
    assert "'ask us'" in reason and "not a number" in reason
    assert db.execute("select question from pgfresh.facts where key = '[1]' and kind = 'statement'").fetchone() == (
        "Blue mug: 12.50 EUR",)


def test_pii_masked_in_documents_and_facts_and_dropped_column_never_rendered(db, dsn, tmp_path):
    db.execute("create table customers (id int primary key, name text, email text, phone text, notes text)")
    path = write_config(tmp_path, dsn, """
[train]
[rag]
[[tables]]
name = "customers"
[tables.gate]
pii = { drop = ["email"], mask = ["phone"] }
[tables.gate.train]
settle_seconds = 0
[[tables.facts]]
name = "notes"
question = "What do we know about {name}?"
answer = "{notes}"
""")
    secrets = ["ada@example.org", "+44 20 7946 0958", "4111 1111 1111 1111", "grace.h@navy.example.com",
               "(415) 555-2671", "555-0199"]
    db.execute("insert into customers values"
               " (1, 'Ada Lovelace', 'ada@example.org', '+44 20 7946 0958', 'Pays by card 4111 1111 1111 1111.'),"
               " (2, 'Grace Hopper', 'grace@example.com', '555-0199', 'Reach her at grace.h@navy.example.com or (415) 555-2671.')")
    sync_once(path)
    rendered = [q for (q,) in db.execute("select question || ' ' || array_to_string(paraphrases, ' ') || ' ' || answer"
                                         " from pgfresh.facts")]
    documents = [t for (t,) in db.execute("select text from pgfresh.documents")]
    assert len(rendered) == 4 and len(documents) == 2
    everything = "\n".join(rendered + documents)
    for secret in secrets + ["grace@example.com", "email:"]:  # the dropped column: not its value, not its line
        assert secret not in everything
    assert "[card]" in everything and "[email]" in everything and "[phone]" in everything
    assert "phone: [redacted]" in everything
    for path_ in ("rag", "train"):  # nor anywhere else the gate keeps rows
        kept = db.execute("select string_agg(row::text, ' ') from pgfresh.gate_seen where path = %s", (path_,)).fetchone()[0]
        assert "example" not in kept and "555" not in kept


def _shop_config(tmp_path, dsn) -> object:
    """The shop's products: key product_id, tenant shop_id (not in the key, so a DELETE lacks it)."""
    return _products_config(tmp_path, dsn, tenant="shop_id")


def test_gone_facts_of_a_tenant_table_keep_their_tenant(db, dsn, tmp_path):
    """Delete, key change and truncate of a table whose tenant is not in the key: no fact without tenant."""
    import psycopg

    from pgfresh.capture import sync

    db.execute("create table products (product_id int primary key, shop_id text not null, name text, price numeric)")
    db.execute("insert into products values (1, 'A', 'Secret mug', 12), (2, 'A', 'Hidden lamp', 30),"
               " (3, 'B', 'Plain cup', 5), (4, 'A', 'Quiet chair', 70)")
    config = cfg.load(_shop_config(tmp_path, dsn))
    sync.run(config, once=True)
    db.execute("delete from products where product_id = 1")
    db.execute("update products set product_id = 20 where product_id = 2")  # key change: old key gone
    sync.run(config, once=True)
    gone = "select key, tenant from pgfresh.facts where kind = 'gone' and status = 'active' order by key"
    assert db.execute(gone).fetchall() == [("[1]", "A"), ("[2]", "A")]
    assert db.execute("select count(*) from pgfresh.rows where tenant is null").fetchone()[0] == 0
    db.execute("truncate products")
    sync.run(config, once=True)
    # The truncate removes rows of both tenants; each "gone" fact keeps its row's tenant.
    assert db.execute(gone).fetchall() == [("[20]", "A"), ("[3]", "B"), ("[4]", "A")]
    assert db.execute("select count(*) from pgfresh.facts where tenant is null").fetchone()[0] == 0
    # A constraint, not a convention: a fact of a tenant table without tenant cannot be stored.
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("insert into pgfresh.facts (fact_id, tbl, key, tenant, kind, template, question, answer, lsn)"
                   " values ('x', 'public.products', '[9]', null, 'gone', 'price', 'q', 'a', '0/0')")
    with pytest.raises(psycopg.errors.CheckViolation):  # nor a captured delete whose row has one
        db.execute("insert into pgfresh.changes (tbl, key, tenant, op, row, lsn) values"
                   " ('public.products', '[9]', null, 'delete', '{\"shop_id\": \"A\"}', '0/0')")


def test_each_change_is_rendered_once_on_the_facts_and_the_rag_path(db, dsn, tmp_path, monkeypatch):
    """The gate deduplicates on the text the consumer writes: one render per change and path, counted.

    Every call of the stage's render hook (the gate's one way to a row's text) must render the row's
    document exactly once, and every change the gate took to rendering (accepted or duplicate) on a
    path must have been rendered exactly once on that path (the old loop rendered each twice: once in
    the gate to deduplicate, once in the consumer to write).
    """
    from pgfresh import render
    from pgfresh.capture import sync
    from pgfresh.rag.index import IndexWorker
    from pgfresh.render.worker import FactsWorker

    db.execute("create table products (id int primary key, name text, price numeric, stock int)")
    db.execute("insert into products select g, 'Mug ' || g, g + 0.5, g from generate_series(1, 12) g")
    path = write_config(tmp_path, dsn, '[train]\n[rag]\n[[tables]]\nname = "products"\n'
                                       '[tables.gate]\nsettle_seconds = 0\n')
    config = cfg.load(path)
    calls: list[tuple[str, int, int]] = []  # (path, seq, documents rendered during the hook)
    documents = [0]
    original_document = render.render_document

    def counted_document(table, row):
        documents[0] += 1
        return original_document(table, row)

    def counting(cls):
        original = cls.render

        def hook(self, table, change):
            before = documents[0]
            try:
                return original(self, table, change)
            finally:
                calls.append((self.path, change.seq, documents[0] - before))
        monkeypatch.setattr(cls, "render", hook)

    monkeypatch.setattr(render, "render_document", counted_document)
    counting(FactsWorker)
    counting(IndexWorker)
    sync.run(config, once=True)
    db.execute("update products set price = price + 1 where id <= 4")
    db.execute("update products set stock = stock where id = 5")  # renders as before: a duplicate
    db.execute("delete from products where id = 6")
    sync.run(config, once=True)
    assert calls and all(n == 1 for _, _, n in calls), calls
    assert documents[0] == len(calls)
    for gate_path in ("train", "rag"):
        rendered = sorted(seq for p, seq, _ in calls if p == gate_path)
        expected = [s for (s,) in db.execute(
            # (the snapshot reaches a consumer as a backfill, whose seqs are not in the change log)
            "select seq from pgfresh.gate_log where path = %s and outcome in ('accepted', 'duplicate')"
            " and seq not in (select seq from pgfresh.changes where op in ('delete', 'truncate')) order by seq",
            (gate_path,))]
        assert rendered == expected and len(expected) == 12 + 5, (gate_path, rendered, expected)
    duplicates = db.execute("select count(*) from pgfresh.gate_log where outcome = 'duplicate'").fetchone()[0]
    assert duplicates == 2  # the unchanged row 5, on each path


def test_the_arena_names_and_fills_fact_templates_as_render_does():
    """One template parser: an unnamed [[tables.facts]] entry has the same name for the arena as in
    pgfresh.facts (was '0' against 'fact0'), and the arena's truth is filled as the facts are
    (`{price:.2f}` of a numeric column: the arena's own parser failed on it)."""
    from decimal import Decimal

    from pgfresh.arena import questions
    from pgfresh.arena.settings import QuestionSpec, fact_templates as arena_templates

    config = cfg.parse({"source": {"dsn": "host=nowhere"}, "tables": [{"name": "products", "facts": [
        {"question": "What does {name} cost?", "answer": "{price:.2f} EUR"},
        {"question": "How many {name} are left?", "answer": "{stock}"}]}]})
    row = {"name": "Blue mug", "price": Decimal("12.5"), "stock": 3}
    rendered = [t.name for t in fact_templates(config.tables[0], row)]
    assert [t.name for t in arena_templates(config, QuestionSpec("public.products"))] == rendered == ["fact0", "fact1"]
    answer = next(f.answer for f in render_facts(config.tables[0], Change("public.products", "insert", [1], row, 0, T0))
                  if f.template == "fact0")
    assert questions.fill("{price:.2f} EUR", row) == answer == "12.50 EUR"
    with pytest.raises(RenderError):
        questions.fill("{colour}", row)
