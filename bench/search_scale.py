"""Search at scale on distinct documents: latency per mode and recall against exact kNN.

Builds N distinct generated products (many attributes each; a unique name and model number, so no
two texts are equal), embeds them with the static embedder, and loads them into the `pgfresh.documents`
table of a store database (migrations applied, the index worker's own HNSW build and the GIN index on
the tsvector), 100 tenants (t0..t99: a tenant filter keeps 1%). Then, for questions about random
products (by name, by description, by attributes), through `pgfresh.rag.search` (query embedding
excluded; the embedder rerank included for hybrid, as users get it by default):
- p50 / p99 ms of dense (HNSW), lexical (full text) and hybrid, unfiltered and with the 1% filter;
- dense recall@10: the top 10 of the dense list against the exact 10 nearest by cosine (a scan
  without the index), unfiltered and filtered; with --exact numpy also `recall@10_ties`, which
  counts a hit as near as the exact 10th (within 1e-3 cosine distance, ann-benchmarks' tolerance)
  as found, so that how many misses are near-ties is visible.

The built server stays in --work (default /tmp/pgfresh-search-scale) so a second run with --reuse
measures settings (ef_search, candidates, ...) without building again.

Run: .venv/bin/python bench/search_scale.py --docs 1000000 [--queries 200] [--keep] [--reuse] [--rag JSON] [--graph JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql
from pgvector.psycopg import register_vector

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgfresh import config as cfg  # noqa: E402
from pgfresh import db as pdb  # noqa: E402
from pgfresh import rag  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402
from pgfresh.rag import embed, generations, retrieval  # noqa: E402

STATIC_CACHE = Path.home() / ".cache" / "pgfresh-bench" / "static-minilm.npy"
KINDS = ["sofa", "lamp", "mug", "rug", "desk", "bicycle", "jacket", "backpack", "kettle", "sneakers", "chair",
         "table", "bookshelf", "blender", "toaster", "helmet", "tent", "scarf", "watch", "umbrella", "pillow",
         "blanket", "skillet", "teapot", "drill", "ladder", "guitar", "camera", "speaker", "monitor", "keyboard",
         "mattress", "wardrobe", "mirror", "vase", "clock", "stroller", "suitcase", "hammock", "printer"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "purple", "orange", "pink", "brown",
          "teal", "beige", "navy", "olive", "maroon"]
MATERIALS = ["oak", "steel", "leather", "wool", "glass", "cotton", "bamboo", "copper", "walnut", "aluminium",
             "linen", "ceramic", "marble", "plastic", "silk", "rattan"]
BRANDS = ["Norvik", "Alder", "Kestrel", "Brightwell", "Osmo", "Tamsin", "Vireo", "Calder", "Lumen", "Harrow",
          "Quill", "Fenwick", "Sable", "Juniper", "Marlow", "Otterly", "Pennant", "Rowan", "Solent", "Tiber"]
STYLES = ["modern", "rustic", "minimalist", "vintage", "industrial", "Scandinavian", "bohemian", "classic",
          "art deco", "coastal"]
SIZES = ["compact", "small", "medium", "large", "extra large", "travel-size"]
FEATURES = ["a lifetime warranty", "free assembly", "a waterproof coating", "USB charging", "a foldable frame",
            "recycled packaging", "a matte finish", "soft-close hinges", "a detachable cover", "an anti-slip base",
            "replaceable parts", "a scratch-resistant surface", "an adjustable height", "a carrying handle",
            "energy saving mode", "a quiet motor", "hand-stitched seams", "a magnetic lid", "a two-year guarantee",
            "machine-washable fabric"]
CITIES = ["Lyon", "Porto", "Osaka", "Quito", "Leeds", "Turin", "Gdansk", "Austin", "Perth", "Cork", "Bergen",
          "Seville", "Ghent", "Tartu", "Brno", "Kyoto", "Dundee", "Malmo", "Bilbao", "Graz", "Halifax", "Adelaide",
          "Tucson", "Nantes", "Split"]
SYL = ["ka", "vo", "ri", "len", "ta", "mo", "zu", "bel", "si", "dra", "quo", "ne", "pa", "lix", "ro", "ven", "ul",
       "mi", "sor", "te", "bra", "nu", "kel", "fa"]


def product(i: int) -> dict:
    """Product i: attributes drawn from a generator seeded by i (the same i, the same product)."""
    r = random.Random(i * 7919 + 17)
    name = "".join(r.choice(SYL) for _ in range(r.randint(2, 4))).capitalize()
    feats = r.sample(FEATURES, 2)
    return {"id": i, "tenant": f"t{i % 100}", "name": name, "model": f"{name[:2].upper()}-{i:07d}",
            "brand": r.choice(BRANDS), "kind": r.choice(KINDS), "color": r.choice(COLORS),
            "material": r.choice(MATERIALS), "style": r.choice(STYLES), "size": r.choice(SIZES),
            "f1": feats[0], "f2": feats[1], "city": r.choice(CITIES), "year": r.randint(1995, 2026),
            "rating": round(r.uniform(2.0, 5.0), 1), "price": round(r.uniform(5, 2500), 2),
            "stock": r.randint(0, 500)}


TEXT = ("{name} {model} by {brand} is a {size} {color} {material} {kind} in a {style} style, with {f1} and {f2}."
        " Made in {city} in {year}; rated {rating} out of 5; {stock} in stock; it costs ${price}.")
QUESTIONS = [
    "How much does the {name} {model} cost?",
    "Do you sell a {color} {material} {kind} by {brand}?",
    "I want a {style} {kind} made of {material} with {f1}.",
    "Which {size} {color} {kind} is made in {city}?",
]


def static_embedder(work: Path):
    """The static embedder (its matrix distilled once and cached, see bench/freshness.py)."""
    data = work / "data"
    (data / "embedders").mkdir(parents=True, exist_ok=True)
    if STATIC_CACHE.exists() and not (data / "embedders" / "static-minilm.npy").exists():
        shutil.copy(STATIC_CACHE, data / "embedders" / "static-minilm.npy")
    model = embed.load({"embedder": "static-minilm"}, data)
    if not STATIC_CACHE.exists():
        STATIC_CACHE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "embedders" / "static-minilm.npy", STATIC_CACHE)
    return model


def build(conn, model, n: int, graph: dict, chunk: int = 20_000) -> dict:
    """Load n products into generation 1 of pgfresh.documents; returns the seconds of each step."""
    t0 = time.perf_counter()
    gen = generations._create(conn, model, "active")
    conn.execute("create unlogged table if not exists staging (key text, tenant text, text text, embedding vector)")
    conn.execute("truncate staging")
    embed_s = 0.0
    with conn.cursor().copy("copy staging (key, tenant, text, embedding) from stdin (format binary)") as cp:
        cp.set_types(["text", "text", "text", "vector"])
        for start in range(0, n, chunk):
            rows = [product(i) for i in range(start, min(n, start + chunk))]
            texts = [TEXT.format(**p) for p in rows]
            t = time.perf_counter()
            vecs = model.embed(texts)
            embed_s += time.perf_counter() - t
            for p, text, v in zip(rows, texts, vecs):
                cp.write_row((f"[{p['id']}]", p["tenant"], text, v))
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    conn.execute("set maintenance_work_mem = '4GB'")
    conn.execute("drop index if exists pgfresh.documents_tsv")  # built once after the load: faster than per row
    conn.execute("alter table pgfresh.documents disable trigger documents_tenant")  # bench rows: no pgfresh.tables
    conn.execute("insert into pgfresh.documents (index_id, tbl, key, tenant, text, tsv, embedding, embedder,"
                 " embedder_version, lsn) select %s, 'public.products', key, tenant, text,"
                 " to_tsvector('english', text), embedding, %s, %s, '0/0' from staging",
                 (gen.id, gen.embedder, gen.version))
    conn.execute("alter table pgfresh.documents enable trigger documents_tenant")
    conn.execute("drop table staging")
    insert_s = time.perf_counter() - t
    t = time.perf_counter()
    conn.execute("create index documents_tsv on pgfresh.documents using gin (tsv)")
    gin_s = time.perf_counter() - t
    t = time.perf_counter()
    generations._ensure_hnsw(conn, gen, graph)
    hnsw_s = time.perf_counter() - t
    conn.execute("vacuum analyze pgfresh.documents")
    return {"embed_s": round(embed_s, 1), "copy_s": round(load_s, 1), "insert_tsvector_s": round(insert_s, 1),
            "gin_s": round(gin_s, 1), "hnsw_s": round(hnsw_s, 1)}


def pct(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"{statistics.median(ms):.1f} / {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.1f}"


def all_vectors(conn, tenant: str | None = None) -> tuple[list[str], np.ndarray]:
    """Every document's key and vector (binary COPY), for exact kNN in numpy."""
    keys, rows = [], []
    where = sql.SQL("") if tenant is None else sql.SQL(" and tenant = {}").format(sql.Literal(tenant))
    with conn.cursor().copy(sql.SQL("copy (select key, embedding from pgfresh.documents where index_id = 1{})"
                                    " to stdout (format binary)").format(where)) as cp:
        cp.set_types(["text", "vector"])
        for key, vec in cp.rows():
            keys.append(key)
            rows.append(vec.to_numpy() if hasattr(vec, "to_numpy") else vec)
    return keys, np.stack(rows).astype(np.float32, copy=False)


def exact_top10(keys: list[str], matrix: np.ndarray, qvecs: np.ndarray) -> list[tuple[list[str], float]]:
    """The exact 10 nearest by cosine (vectors are unit length: a dot product) and the 10th's
    similarity, per query."""
    out = []
    for start in range(0, len(qvecs), 16):
        sims = qvecs[start:start + 16] @ matrix.T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        out += [([keys[i] for i in row], float(s[row].min())) for row, s in zip(top, sims)]
    return out


_EXACT: dict = {}


def measure(conn, dsn: str, work: Path, n: int, n_queries: int, rag_settings: dict, exact_in: str) -> None:
    plain = cfg.parse({"source": {"dsn": dsn}, "tables": [{"name": "products"}], "rag": rag_settings},
                      path=work / "pgfresh.toml")
    tenants = cfg.parse({"source": {"dsn": dsn}, "tables": [{"name": "products", "tenant": "tenant"}],
                         "rag": rag_settings}, path=work / "pgfresh.toml")
    for c in (plain, tenants):
        c.source.data_dir = str(work / "data")
    rng = random.Random(1)
    qs = []
    for j in range(n_queries):
        p = product(rng.randrange(n))
        qs.append(QUESTIONS[j % len(QUESTIONS)].format(**p))
    model = retrieval.active_generation(conn, plain).model
    qvecs = model.embed(qs)
    for _ in range(3):  # warm the cache of statistics and the first plans
        rag.search(conn, plain, qs[0], None, 10, "hybrid", qvec=qvecs[0])
    for label, config, tenant in (("none", plain, None), ("1% tenant", tenants, "t7")):
        if exact_in == "numpy":
            t = time.perf_counter()
            if tenant not in _EXACT:  # the same queries for every setting: read and rank once
                _EXACT[tenant] = exact_top10(*all_vectors(conn, tenant), qvecs)
            exact_all = _EXACT[tenant]
            exact_note = f"numpy, {time.perf_counter() - t:.0f} s with the read"
        lat = {"dense": [], "lexical": [], "hybrid": []}
        recall, near, exact_ms = [], [], []
        for j, (q, v) in enumerate(zip(qs, qvecs)):
            for mode in ("dense", "lexical", "hybrid"):
                t = time.perf_counter()
                hits = rag.search(conn, config, q, tenant, 10, mode, rerank=None if mode == "hybrid" else "none", qvec=v)
                lat[mode].append((time.perf_counter() - t) * 1000)
                if mode == "dense":
                    dense_hits, dense = hits, [h.key for h in hits]
            if exact_in == "numpy":
                exact, tenth = exact_all[j]
                # ann-benchmarks' tolerance: a hit as near as the exact 10th (within 1e-3 in cosine
                # distance) counts, so a tie broken the other way is not a miss
                near.append(sum(h.scores["dense"] >= tenth - 1e-3 for h in dense_hits) / 10)
            else:
                t = time.perf_counter()
                exact = [e[1] for e in retrieval.exact_dense(conn, config, v, tenant, 10)]
                exact_ms.append((time.perf_counter() - t) * 1000)
            recall.append(len(set(dense) & set(exact)) / max(1, len(exact)))
        print(json.dumps({"docs": n, "filter": label, "queries": len(qs), "recall@10": round(float(np.mean(recall)), 4),
                          **({"recall@10_ties": round(float(np.mean(near)), 4)} if near else {}),
                          "dense_ms": pct(lat["dense"]), "lexical_ms": pct(lat["lexical"]),
                          "hybrid_ms": pct(lat["hybrid"]),
                          "exact_ms": pct(exact_ms) if exact_ms else exact_note, "rag": rag_settings,
                          "load": round(os.getloadavg()[0], 2)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--work", default="/tmp/pgfresh-search-scale")
    ap.add_argument("--reuse", action="store_true", help="measure the server already built in --work")
    ap.add_argument("--rag", default="[{}]", help='[rag] settings as a JSON list, one measurement each, e.g. [{"ef_search": 400}]')
    ap.add_argument("--exact", choices=("numpy", "sql"), default="numpy",
                    help="exact kNN in numpy (all vectors read once) or by a scan in SQL (seconds per query at 1M)")
    ap.add_argument("--graph", default="{}", help='HNSW build settings as JSON, e.g. {"hnsw_m": 32, "hnsw_ef_construction": 128}')
    ap.add_argument("--keep", action="store_true", help="leave the server in --work (for --reuse)")
    ap.add_argument("--toast-default", action="store_true",
                    help="build with PostgreSQL's default TOAST threshold (vectors out of line, as before migration 015)")
    args = ap.parse_args()
    work = Path(args.work)
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(work / "pg", settings={"shared_buffers": "2GB", "max_parallel_maintenance_workers": "2"})
    dsn = server.start()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.docs} documents", flush=True)
    try:
        conn = pdb.connect(dsn, "bench", autocommit=True)
        pdb.migrate(conn)
        register_vector(conn)
        if not args.reuse:
            if args.toast_default:
                conn.execute("alter table pgfresh.documents reset (toast_tuple_target)")
            model = static_embedder(work)
            graph = json.loads(args.graph)
            print(json.dumps({"docs": args.docs, "graph": graph, "build": build(conn, model, args.docs, graph)}), flush=True)
        else:
            static_embedder(work)
        size = conn.execute("select pg_size_pretty(pg_total_relation_size('pgfresh.documents')),"
                            " pg_size_pretty(pg_relation_size(reltoastrelid)) from pg_class"
                            " where oid = 'pgfresh.documents'::regclass").fetchone()
        print(f"pgfresh.documents with its indexes: {size[0]} (TOAST: {size[1]})", flush=True)
        for settings in json.loads(args.rag):
            measure(conn, dsn, work, args.docs, args.queries, {"embedder": "static-minilm", **settings}, args.exact)
        conn.close()
    finally:
        server.stop() if args.keep or args.reuse else server.destroy()
        if not (args.keep or args.reuse):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
