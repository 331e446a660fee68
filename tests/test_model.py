"""pgfresh.model: the built-in model (built once per session, real PostgreSQL, real capture and render),
loading any HF directory with clear errors, the prompt format, and the accelerate launch line."""

from __future__ import annotations

import json
import random
import shutil

import psycopg
import pytest

from pgfresh import config as cfg
from pgfresh import model
from pgfresh.train import data, fit
from tests.conftest import run_cli, write_config
from tests.train_support import N_PRODUCTS, base_model  # noqa: F401  (session fixture)

pytestmark = pytest.mark.timeout(1800)  # the first test's setup builds the model (500 s at load 12)


def _facts(dsn: str):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return data.load_facts(conn, tenant=None)


def test_build_answers_its_own_facts_and_held_out_paraphrases(base_model):
    facts = _facts(base_model.dsn)
    assert len(facts) == N_PRODUCTS
    loaded = model.load(base_model.dir)
    own = fit.correct(loaded, [(f.question, f.answer) for f in facts])
    held = fit.correct(loaded, [(data.held_out(f, 6), f.answer) for f in facts])
    # the phrasings held out were never trained on; chance is about 1 in N_PRODUCTS
    assert sum(own) / len(own) >= 0.9, sum(own)
    assert sum(held) / len(held) >= 0.5, sum(held)
    meta = base_model.meta
    assert meta["facts"] == N_PRODUCTS and meta["accuracy"]["own"] >= 0.9
    assert meta["training_tokens"] > 0 and meta["params"] < 5_000_000
    assert sorted(model.known_facts(base_model.dir)) == sorted(f.fact_id for f in facts)


def test_build_reads_a_value_it_never_saw_from_the_document(base_model):
    """The same model serves `rag`: given its row's document stating a value drawn for the test
    (never trained on) among distractors, it answers from the document, not from memory."""
    facts = _facts(base_model.dsn)
    with psycopg.connect(base_model.dsn, autocommit=True) as conn:
        docs = data.load_documents(conn, tenant=None)
    loaded = model.load(base_model.dir)
    real = {f.answer for f in facts}
    books = [(p, a.strip()) for p, a in data.open_book(facts, docs, 0.5, 2, 12345, 6, counterfactual=1.0)
             if a.strip() not in real]  # training phrasings; values no row ever had
    assert len(books) >= 100
    got = fit.predict(loaded, [p for p, _ in books], [" " + a for _, a in books])
    read = sum(fit.normalize(g) == fit.normalize(a) for g, (_, a) in zip(got, books)) / len(books)
    # chance of spelling an unseen random price is ~0: the built-in model copies from the document
    assert read >= 0.3, read
    print(f"open-book on unseen values: {read:.2f} ({len(books)} prompts)")
    # the build's own figure: held-out phrasings, two distractors (0.18 on this table, 0.47 on the demo's)
    assert base_model.meta["accuracy"]["open_book"] >= 0.1, base_model.meta["accuracy"]


def test_model_dir_is_a_plain_hugging_face_directory(base_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pgfresh.rag.reader import HFReader

    facts = _facts(base_model.dsn)[:10]
    tok = AutoTokenizer.from_pretrained(str(base_model.dir))
    lm = AutoModelForCausalLM.from_pretrained(str(base_model.dir))
    loaded, reader = model.load(base_model.dir), HFReader(base_model.dir)
    hf = []
    for f in facts:
        ids = tok(model.format_prompt(f.question), return_tensors="pt")["input_ids"]
        out = lm.generate(ids, max_new_tokens=12, do_sample=False)  # stops at EOS from generation_config
        hf.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    # parity: plain transformers, the RAG reader and pgfresh's own generation give the same answers
    # (the same weights, greedy); and they are the facts' answers, not just the same noise
    ours = [model.generate(loaded, [model.format_prompt(f.question)], max_new_tokens=12)[0] for f in facts]
    assert hf == ours == [reader.generate(model.format_prompt(f.question), 12) for f in facts]
    assert sum(a == f.answer for a, f in zip(hf, facts)) >= 8, (hf, [f.answer for f in facts])


def test_model_info_cli(base_model):
    out = run_cli("model", "info", "--json", "--config", str(base_model.config_path))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["builtin"] and info["architecture"] == "LlamaForCausalLM"
    assert info["lsn"] != "0/0" and info["params"] == base_model.meta["params"]
    assert {"training_tokens", "tokens_per_s", "accuracy", "layers", "hidden", "vocab_size"} <= set(info)


def test_tokenizer_spells_numbers_digit_by_digit():
    tok = model.train_tokenizer(["The price of Calm Lamp is 123.45 today"] * 20, 400)
    pieces = tok.convert_ids_to_tokens(tok(" 123.45", add_special_tokens=False)["input_ids"])
    assert [p.lstrip("Ġ") for p in pieces if p.lstrip("Ġ")] == ["1", "2", "3", ".", "4", "5"]
    assert tok.decode(tok("Q: naïve café 42?\nA:")["input_ids"]) == "Q: naïve café 42?\nA:"


def test_format_prompt_closed_and_open_book():
    assert model.format_prompt("What is  the price\nof X?") == "Q: What is the price of X?\nA:"
    p = model.format_prompt("Q?", ["products\nname: X\nprice: 1", "other  doc"])
    assert p == "D: other doc\nD: products name: X price: 1\nQ: Q?\nA:"  # best first in, best nearest the question
    assert model.answer_text(" 12.50 ") == " 12.50"


def test_load_errors_are_one_clear_line(tmp_path, base_model):
    with pytest.raises(model.ModelError, match="model build"):
        model.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(model.ModelError, match="no config.json"):
        model.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(base_model.dir, broken)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(model.ModelError, match="cannot be read"):
        model.load(broken)
    # a tokenizer with more tokens than the model has embeddings
    mismatch = tmp_path / "mismatch"
    shutil.copytree(base_model.dir, mismatch)
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(5000)]
    bigger = model.train_tokenizer(texts, 3000)
    assert len(bigger) > base_model.meta["vocab_size"]
    bigger.save_pretrained(str(mismatch))
    with pytest.raises(model.ModelError, match="tokenizer mismatch"):
        model.load(mismatch)


def test_cli_without_a_model_says_how_to_build_one(tmp_path, dsn):
    path = write_config(tmp_path, dsn, 'data_dir = "data"\n[[tables]]\nname = "public.t"\n')
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("create table t (id int primary key, v text)")
    out = run_cli("model", "info", "--config", str(path))
    assert out.returncode == 2 and "pgfresh model build" in out.stderr
    out = run_cli("model", "build", "--config", str(path))  # the table is empty: no facts yet
    assert out.returncode == 2 and "no facts" in out.stderr


def test_check_config_reports_every_train_problem_with_its_key(tmp_path):
    raw = {"source": {"dsn": "postgresql://x"}, "train": {
        "replay_ratio": 1.5, "method": "qlora", "lora_rank": 0, "epochs": "ten", "bogus": 1,
        "model": {"hidden": 8, "tenant_facts": "yes", "what": 2}}}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(raw, tmp_path / "pgfresh.toml")
    problems = err.value.problems
    for key in ("train.replay_ratio", "train.method", "train.lora_rank", "train.epochs", "train.bogus",
                "train.model.hidden", "train.model.tenant_facts", "train.model.what"):
        assert any(p.startswith(key + ":") for p in problems), (key, problems)
    ok = cfg.parse({"source": {"dsn": "postgresql://x"}, "train": {"replay_ratio": 0.25, "model": {"layers": 3}}})
    from pgfresh.train import settings

    s = settings(ok)
    assert s.replay_ratio == 0.25 and s.model["layers"] == 3 and s.model["vocab_size"] == 1024


def test_accelerate_launch_line_from_the_docs_parses():
    """docs/TRAINING.md's multi-GPU line, parsed by accelerate's own parser."""
    from accelerate.commands.launch import launch_command_parser

    line = ("--multi_gpu --num_processes 4 --mixed_precision bf16 -m pgfresh train --once "
            "--config pgfresh.toml").split()
    args = launch_command_parser().parse_args(line)
    assert args.module and args.training_script == "pgfresh"
    assert args.training_script_args == ["train", "--once", "--config", "pgfresh.toml"]
    assert args.num_processes == 4 and args.mixed_precision == "bf16" and args.multi_gpu


def test_a_build_of_the_same_content_is_copied_from_the_cache_and_a_change_rebuilds(tmp_path, dsn, dsn2):
    from tests.train_support import TABLES, create_products, products, sync_once

    cache = tmp_path / "cache"
    tiny = f'[train.model]\nepochs = 1\nmin_steps = 0\nreading_steps = 0\nhidden = 32\ncache_dir = "{cache}"\n'
    paths = []
    for d, source in ((tmp_path / "a", dsn), (tmp_path / "b", dsn2)):  # two sources with the same rows
        d.mkdir()
        with psycopg.connect(source, autocommit=True) as c:
            create_products(c, products(4))
        paths.append(write_config(d, source, f'data_dir = "data"\nslot = "{d.name}_{tmp_path.name[-12:]}"\n' + TABLES + "\n[train]\nthreads = 1\n" + tiny))
        sync_once(paths[-1])
    first = model.build(cfg.load(paths[0]))
    assert "cached" not in first and (cache / first["build_key"] / "config.json").exists()
    second = model.build(cfg.load(paths[1]))
    assert second["cached"] == str(cache / first["build_key"]) and second["build_id"] == first["build_id"]
    a, b = tmp_path / "a" / "data" / "model", tmp_path / "b" / "data" / "model"
    assert model.base_id(a) == model.base_id(b) and model.known_facts(a) == model.known_facts(b)
    assert model.load(b).model.num_parameters() == first["params"]
    with psycopg.connect(dsn2, autocommit=True) as c:  # a changed price is another build
        c.execute("update products set price = price + 1 where id = 0")
    sync_once(paths[1])
    third = model.build(cfg.load(paths[1]))
    assert "cached" not in third and third["build_key"] != first["build_key"]
