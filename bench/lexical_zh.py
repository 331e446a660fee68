"""Chinese lexical search: character bigrams (what pgfresh does) vs jieba word segmentation.

The shop-zh catalogue (pgfresh.arena.workload's Chinese vocabulary; names unique), each product's
document as shop-zh.toml renders it, and questions that name one product: the training
phrasings, the arena's held-out phrasings, and the same questions with one wrong character in the
name (别字, as the workload's noise makes) or with the name's words reordered around a particle
("橡木做的北欧水壶" for 北欧橡木水壶: no bigram spans the old word boundary, a segmenter's words survive). Each variant indexes the documents in PostgreSQL full text (`simple` configuration)
and answers with pgfresh's own lexical query: an OR of the question's lexemes without those in
more than 20% of documents (`rag.lexical_max_df`), ranked by ts_rank. Reported: hit@1, hit@5 per
question kind, index size, and query latency.

Variants:
    bigrams     pgfresh.rag.lexical: overlapping character bigrams of every Chinese run
    jieba       jieba.cut (precise mode, its shipped dictionary), words joined by spaces
    jieba+bi    both lexeme sets together

Run: .venv/bin/python bench/lexical_zh.py [--products 600] [--seed 1]   (needs `pip install jieba`)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import psycopg

from pgfresh.arena import workload as w
from pgfresh.embedded import EmbeddedServer
from pgfresh.rag.lexical import bigram_text, or_query

DOCUMENT = "{name}（{category}）售价{price}元；库存{stock}件；状态published。{description}"
QUESTIONS = {
    "trained": ["{name}的价格是多少？", "{name}多少钱？", "{name}还有多少库存？", "{name}属于哪个类别？"],
    "held_out": ["如果我今天买{name}，要付多少钱？", "请告诉我{name}的售价。", "{name}有货吗？还剩多少？",
                 "在店里哪个区能找到{name}？"],
}
MAX_DF = 0.2


def catalogue(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    shop = w.ShopZhWorkload.__new__(w.ShopZhWorkload)  # only its vocabulary methods are used
    used: set[str] = set()
    out = []
    combos = len(w.ZH_ADJECTIVES) * len(w.ZH_MATERIALS) * len(shop.category_of)
    for i in range(min(n, combos // 2)):
        name, cat, desc = shop._new_product(rng, used)
        out.append({"id": i + 1, "name": name, "category": cat, "description": desc, "adj": None,
                    "price": f"{rng.randint(199, 19999) / 100:.2f}", "stock": rng.randint(0, 150)})
    return out


def _wrong_character(name: str, rng: random.Random) -> str | None:
    spots = [i for i, ch in enumerate(name) if ch in w.ZH_WRONG_CHARACTERS]
    if not spots:
        return None
    i = rng.choice(spots)
    return name[:i] + w.ZH_WRONG_CHARACTERS[name[i]] + name[i + 1:]


def _reordered(name: str) -> str | None:
    adj = next((a for a in w.ZH_ADJECTIVES if name.startswith(a)), None)
    if adj is None:
        return None
    rest = name[len(adj):]
    material = next((m for m in sorted(w.ZH_MATERIALS, key=len, reverse=True) if rest.startswith(m)), None)
    return None if material is None else f"{material}做的{adj}{rest[len(material):]}"


def questions(rows: list[dict], seed: int) -> list[tuple[str, int, str]]:
    rng = random.Random(seed + 1)
    out = []
    for r in rows:
        for kind, templates in QUESTIONS.items():
            out.append((rng.choice(templates).format(name=r["name"]), r["id"], kind))
        typo = _wrong_character(r["name"], rng)
        if typo:
            out.append((rng.choice(QUESTIONS["trained"]).format(name=typo), r["id"], "wrong_character"))
        moved = _reordered(r["name"])
        if moved:
            out.append((rng.choice(QUESTIONS["held_out"]).format(name=moved), r["id"], "reordered"))
    return out


def lexemes_jieba(text: str) -> str:
    import jieba

    return " ".join(t for t in jieba.cut(text) if t.strip())


VARIANTS = {
    "bigrams": lambda t: bigram_text(t),
    "jieba": lexemes_jieba,
    "jieba+bi": lambda t: lexemes_jieba(t) + " " + bigram_text(t),
}


def run_variant(conn, name: str, to_lexemes, rows, qs) -> dict:
    conn.execute("drop table if exists docs")
    conn.execute("create table docs (id int primary key, tsv tsvector)")
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.executemany("insert into docs values (%s, to_tsvector('simple', %s))",
                        [(r["id"], to_lexemes(DOCUMENT.format(**r))) for r in rows])
    index_s = time.perf_counter() - t0
    conn.execute("create index on docs using gin (tsv)")
    conn.execute("analyze docs")
    (n_docs,) = conn.execute("select count(*) from docs").fetchone()
    df = dict(conn.execute("select word, ndoc::float8 / %s from ts_stat('select tsv from docs')", (n_docs,)).fetchall())
    (lexemes,) = conn.execute("select sum(length(tsv)) from docs").fetchone()
    hits: dict[str, list[tuple[bool, bool]]] = {}
    lat = []
    for text, want, kind in qs:
        t0 = time.perf_counter()
        qlex = conn.execute("select tsvector_to_array(to_tsvector('simple', %s))", (to_lexemes(text),)).fetchone()[0]
        got = []
        if qlex:
            tsq = or_query(qlex, df, MAX_DF)
            got = [r[0] for r in conn.execute(
                "select id from docs where tsv @@ to_tsquery('simple', %s)"
                " order by ts_rank(tsv, to_tsquery('simple', %s)) desc, id limit 5", (tsq, tsq))]
        lat.append(time.perf_counter() - t0)
        hits.setdefault(kind, []).append((got[:1] == [want], want in got))
    out = {"variant": name, "lexemes_per_doc": lexemes / n_docs, "index_s": index_s,
           "p50_ms": 1000 * statistics.median(lat)}
    for kind, hs in hits.items():
        out[kind] = (sum(h[0] for h in hs) / len(hs), sum(h[1] for h in hs) / len(hs), len(hs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--products", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import jieba

    jieba.setLogLevel(60)
    jieba.initialize()
    rows = catalogue(args.products, args.seed)
    qs = questions(rows, args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="pgfresh-lexzh-")
    server = EmbeddedServer(os.path.join(work, "pg"))
    try:
        with psycopg.connect(server.start(), autocommit=True) as conn:
            kinds = sorted({k for _, _, k in qs})
            print(f"{len(rows)} products, {len(qs)} questions; hit@1 / hit@5 per kind (n)")
            print("variant    lexemes/doc  p50 ms  " + "  ".join(f"{k:>22}" for k in kinds))
            for name, fn in VARIANTS.items():
                r = run_variant(conn, name, fn, rows, qs)
                cells = "  ".join(f"{r[k][0]:>9.3f} / {r[k][1]:.3f} ({r[k][2]:>4})" for k in kinds)
                print(f"{name:<10} {r['lexemes_per_doc']:>11.1f} {r['p50_ms']:>7.2f}  {cells}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
