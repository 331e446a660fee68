"""Search quality and search speed, on one embedded server.

1. quality: the generated labelled set (pgfresh.rag.evalset, 640 products, 1,280 questions) indexed
   through capture; hit@1 / hit@5 of every retrieval mode, fusion and rerank, through the real
   pipeline (`pgfresh.rag.search`). This is the measurement behind the defaults in `[rag]`.
2. scale: recall@10 of the HNSW index against exact kNN, and p50/p99 latency (dense ANN, exact,
   lexical, hybrid; query embedding excluded) at each level of documents, unfiltered and with a
   1% tenant filter (100 tenants). Up to `--real` documents carry real MiniLM embeddings of product
   texts; above that, synthetic ones: a real vector plus Gaussian noise, renormalised (clustered
   like real embeddings, unlike uniform random vectors, which make HNSW look worse than it is).

Run: .venv/bin/python bench/search.py [--levels 10000,100000] [--queries 200] [--skip-quality]
     (add 1000000 to --levels for the 1M level: ~1.5 GB of vectors and a long HNSW build)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgfresh import config as cfg  # noqa: E402
from pgfresh import db as pdb  # noqa: E402
from pgfresh import rag  # noqa: E402
from pgfresh.capture import sync  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402
from pgfresh.rag import embed, evalset, generations, retrieval  # noqa: E402

VARIANTS = [  # (mode, fusion, rerank)
    ("dense", None, "none"), ("lexical", None, "none"),
    ("hybrid", "rrf", "none"), ("hybrid", "weighted", "none"),
    ("dense", None, "embedder"), ("lexical", None, "embedder"),
    ("hybrid", "rrf", "embedder"), ("hybrid", "weighted", "embedder"),
]


def new_database(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'drop database if exists "{name}" with (force)')
        c.execute(f'create database "{name}"')
    return admin.replace("dbname=postgres", f"dbname={name}")


def quality(admin: str, work: str, embedder: str) -> None:
    dsn = new_database(admin, f"quality_{embedder.replace('-', '_')}")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(evalset.TABLE_SQL.format(table="products"))
        rows = evalset.products(640, seed=1)
        c.cursor().executemany(
            "insert into products values (%(id)s, %(tenant)s, %(name)s, %(kind)s, %(color)s, %(material)s,"
            " %(city)s, %(price)s)", rows)
    config = cfg.parse({"source": {"dsn": dsn, "slot": f"bench_{embedder.replace('-', '_')}"},
                        "rag": {"embedder": embedder},
                        "tables": [{"name": "products", "document": evalset.DOCUMENT}]}, path=_path(work))
    t = time.perf_counter()
    sync.run(config, once=True)
    print(f"embedder {embedder}: indexed 640 documents through capture in {time.perf_counter() - t:.1f} s")
    conn = pdb.connect(dsn, "bench", autocommit=True)
    register_vector(conn)
    questions = evalset.questions(rows, seed=1)
    model = retrieval.active_generation(conn, config).model
    qvecs = model.embed([q[0] for q in questions])
    print(f"{'mode':8} {'fusion':9} {'rerank':9} {'name h@1/h@5':>14} {'describe h@1/h@5':>17} {'all h@1/h@5':>13} {'ms/q':>6}")
    for mode, fusion, rerank in VARIANTS:
        hit = {c: [0, 0, 0] for c in ("name", "describe", "all")}
        t = time.perf_counter()
        for (q, pid, cls), v in zip(questions, qvecs):
            keys = [h.key for h in rag.search(conn, config, q, None, 5, mode, fusion=fusion, rerank=rerank, qvec=v)]
            for c in (cls, "all"):
                hit[c][0] += keys[:1] == [f"[{pid}]"]
                hit[c][1] += f"[{pid}]" in keys
                hit[c][2] += 1
        ms = (time.perf_counter() - t) / len(questions) * 1000
        cells = [f"{h[0] / h[2]:.3f}/{h[1] / h[2]:.3f}" for h in hit.values()]
        print(f"{mode:8} {fusion or '-':9} {rerank:9} {cells[0]:>14} {cells[1]:>17} {cells[2]:>13} {ms:6.1f}", flush=True)
    conn.close()


def _path(work: str) -> Path:
    return Path(work) / "pgfresh.toml"


def corpus_vectors(n_real: int, rng: np.random.Generator):
    """Real MiniLM vectors of n_real product texts (names vary, descriptions repeat), and their texts."""
    base = evalset.products(640, seed=2)
    texts = []
    for i in range(n_real):
        r = dict(base[i % len(base)])
        r["name"] = f"{r['name']}{i}"
        r["price"] = round(float(rng.uniform(5, 900)), 2)
        texts.append(evalset.render(r))
    model = embed.load({"embed_threads": 1}, Path(tempfile.gettempdir()))
    return model.embed(texts), texts, model


def load_level(conn, n: int, real: np.ndarray, texts: list[str], rng: np.random.Generator, sigma: float) -> float:
    """Fill pgfresh.documents with n documents (real first, then perturbed copies); returns build seconds."""
    conn.execute("truncate pgfresh.documents")
    conn.execute("drop index if exists pgfresh.documents_hnsw_1")
    conn.execute("create temp table if not exists staging (key text, tenant text, text text, embedding vector(384))")
    conn.execute("truncate staging")
    with conn.cursor().copy("copy staging (key, tenant, text, embedding) from stdin") as cp:
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            idx = np.arange(start, start + count)
            vecs = real[idx % len(real)].copy()
            synth = idx >= len(real)
            if synth.any():
                v = vecs[synth] + rng.standard_normal((int(synth.sum()), real.shape[1])).astype(np.float32) * sigma
                vecs[synth] = v / np.linalg.norm(v, axis=1, keepdims=True)
            for j, i in enumerate(idx):
                text = texts[i % len(texts)] + ("" if i < len(texts) else f" #{i}")
                cp.write_row((f"[{i}]", f"t{i % 100}", text, vecs[j]))
    conn.execute("insert into pgfresh.documents (index_id, tbl, key, tenant, text, tsv, embedding, embedder,"
                 " embedder_version, lsn) select 1, 'public.products', key, tenant, text,"
                 " to_tsvector('english', text), embedding, 'bench', '1', '0/0' from staging")
    t = time.perf_counter()
    conn.execute("set maintenance_work_mem = '2GB'")
    generations._ensure_hnsw(conn, generations.Generation(1, "bench", "1", real.shape[1], "active"), {})
    build = time.perf_counter() - t
    conn.execute("vacuum analyze pgfresh.documents")
    return build


def percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"{statistics.median(ms):7.2f} {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:7.2f}"


def scale(admin: str, work: str, levels: list[int], n_real: int, n_queries: int) -> None:
    dsn = new_database(admin, "scale")
    conn = pdb.connect(dsn, "bench", autocommit=True)
    pdb.migrate(conn)
    register_vector(conn)
    conn.execute("insert into pgfresh.rag_indexes (embedder, embedder_version, dim, state) values ('bench', '1', 384, 'active')")
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    real, texts, model = corpus_vectors(min(n_real, max(levels)), rng)
    print(f"embedded {len(real)} real documents in {time.perf_counter() - t:.1f} s")
    qs = [q for q, _, _ in evalset.questions(evalset.products(640, seed=2), seed=2)][:n_queries]
    qvecs = model.embed(qs)
    # sigma: the noise gives perturbed copies a cosine of ~0.8 to their source (a near-duplicate product).
    sigma = 0.035
    plain = cfg.parse({"source": {"dsn": dsn}, "tables": [{"name": "products"}], "rag": {}}, path=_path(work))
    tenants = cfg.parse({"source": {"dsn": dsn}, "tables": [{"name": "products", "tenant": "t"}], "rag": {}},
                        path=_path(work))
    print(f"{'docs':>8} {'filter':7} {'recall@10':>9} {'ANN p50/p99 ms':>15} {'exact p50/p99':>15} "
          f"{'lexical p50/p99':>15} {'hybrid p50/p99':>15}")
    for n in levels:
        build = load_level(conn, n, real, texts, rng, sigma)
        print(f"(level {n}: HNSW built in {build:.1f} s)", flush=True)
        for label, config, tenant in (("none", plain, None), ("1%", tenants, "t7")):
            rec, ratio, lat = [], [], {"ann": [], "exact": [], "lexical": [], "hybrid": []}
            for q, v in zip(qs, qvecs):
                t = time.perf_counter()
                hits = rag.search(conn, config, q, tenant, 10, "dense", rerank="none", qvec=v)
                lat["ann"].append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                exact = retrieval.exact_dense(conn, config, v, tenant, 10)
                lat["exact"].append((time.perf_counter() - t) * 1000)
                rec.append(len({h.key for h in hits} & {e[1] for e in exact}) / max(1, len(exact)))
                # Near-ties make recall harsh: how close in cosine are the neighbours HNSW returned?
                ratio.append(np.mean([h.scores["dense"] for h in hits]) / np.mean([e[2] for e in exact]))
                for mode in ("lexical", "hybrid"):
                    t = time.perf_counter()
                    rag.search(conn, config, q, tenant, 10, mode, rerank="none", qvec=v)
                    lat[mode].append((time.perf_counter() - t) * 1000)
            print(f"{n:8d} {label:7} {np.mean(rec):9.3f} {percentiles(lat['ann']):>15} {percentiles(lat['exact']):>15} "
                  f"{percentiles(lat['lexical']):>15} {percentiles(lat['hybrid']):>15}"
                  f"   (mean cosine of the HNSW top 10 / exact top 10: {np.mean(ratio):.4f})", flush=True)
        ef_sweep(conn, dsn, work, n, qs, qvecs)
    conn.close()


def ef_sweep(conn, dsn: str, work: str, n: int, qs: list[str], qvecs) -> None:
    """recall@10 and latency of unfiltered dense search against hnsw.ef_search."""
    cells = []
    for ef in (40, 100, 200, 400):
        config = cfg.parse({"source": {"dsn": dsn}, "tables": [{"name": "products"}], "rag": {"ef_search": ef,
                            "candidates": 10}}, path=_path(work))
        rec, lat = [], []
        for q, v in zip(qs, qvecs):
            t = time.perf_counter()
            ann = [h.key for h in rag.search(conn, config, q, None, 10, "dense", rerank="none", qvec=v)]
            lat.append((time.perf_counter() - t) * 1000)
            exact = [e[1] for e in retrieval.exact_dense(conn, config, v, None, 10)]
            rec.append(len(set(ann) & set(exact)) / 10)
        cells.append(f"ef_search {ef}: recall {np.mean(rec):.3f}, p50 {statistics.median(lat):.2f} ms")
    print(f"{n:8d} unfiltered dense, k=10: " + "; ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="10000,100000", help="document counts, comma-separated")
    ap.add_argument("--real", type=int, default=10_000, help="documents with real MiniLM embeddings")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--embedders", default="minilm", help="embedders for the quality part, e.g. minilm,static-minilm")
    ap.add_argument("--skip-scale", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pgfresh-bench-search-")
    server = EmbeddedServer(os.path.join(work, "pg"))
    admin = server.start()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    try:
        if not args.skip_quality:
            for name in args.embedders.split(","):
                quality(admin, work, name)
        if not args.skip_scale:
            scale(admin, work, [int(x) for x in args.levels.split(",")], args.real, args.queries)
    finally:
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
