"""Search: dense (HNSW), lexical (full text + bigrams), hybrid (RRF or weighted fusion), then rerank.

The pipeline, every stage's score kept on the hit for `--json`:

1. candidates (at most `rag.candidates`, default 100) from one or both retrievers, each in SQL with
   the tenant filter in its WHERE clause, so no other tenant's row ever leaves PostgreSQL:
   - dense: HNSW cosine over the active generation, with pgvector's iterative index scans
     (`hnsw.iterative_scan = relaxed_order`), so a selective filter still yields enough rows; a
     tenant filter that keeps at most `rag.exact_max_rows` documents (by ANALYZE's statistics)
     ranks them exactly instead (recall 1, and faster at a million documents);
   - lexical: `tsvector @@ tsquery` on the GIN index, any question word or bigram, ranked by ts_rank;
     words found in more than `rag.lexical_max_df` of the documents (PostgreSQL's own statistics of
     the tsvector column) are left out of the match, so "price" does not make every row a candidate;
     and the words matched are the rarest ones whose rows add up to `rag.lexical_max_rows`, plus the
     rows holding every word (ranking cost stays bounded at a million documents).
   Both queries also compute the other retriever's score for their rows (and the share of the
   question's words a row contains), so fusion and rerank see every score of every candidate.
2. fusion (hybrid): reciprocal rank fusion, or a weighted sum of min-max normalised scores.
3. rerank of the best `rag.rerank_depth` (<= 100): a cross-encoder when `rag.rerank_model` names
   one, else the embedder over whole documents (chunked past its token limit) plus word overlap.

A request without a tenant is refused when any configured table declares a tenant column.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from pgfresh.errors import PgfreshError
from pgfresh.rag import embed, generations
from pgfresh.rag.lexical import TSVECTOR_SQL, bigram_text, common_lexemes, document_count, match_query, or_query

MODES = ("dense", "lexical", "hybrid")
FUSIONS = ("rrf", "weighted")
RERANKS = ("auto", "embedder", "cross-encoder", "none")

DEFAULTS = {
    "candidates": 100,
    "fusion": "weighted",  # measured better than rrf on the labelled set (docs/BENCHMARKS.md, "RAG")
    "rrf_k": 60,
    "dense_weight": 0.5,
    "lexical_weight": 0.5,
    "rerank": "auto",  # a cross-encoder if rag.rerank_model names one, else the embedder re-score
    "rerank_depth": 50,
    "rerank_overlap_weight": 0.2,
    "ef_search": 200,  # recall@10 0.93 at 10k, 0.89 at 100k near-duplicate documents, against 0.86 / 0.83 at 100
    "text_search_config": "english",
    "lexical_max_df": 0.2,
    "lexical_max_rows": 5000,  # rows a lexical query may match and rank (lexical.match_query; BENCHMARKS, 1M)
    "exact_max_rows": 20000,  # a tenant filter keeping at most this many documents: exact dense ranking
    "mode": "hybrid",
}


class TenantRequired(PgfreshError):
    """A search on tables with a tenant column must name the tenant."""


class NotIndexed(PgfreshError):
    """Nothing has been indexed yet."""


@dataclass
class Hit:
    tbl: str
    key: str
    tenant: str | None
    text: str
    lsn: str
    commit_time: datetime | None
    score: float = 0.0  # the final one: rerank if it ran, else fused, else the single retriever's
    scores: dict = field(default_factory=dict)  # dense (cosine), lexical (ts_rank), overlap, fused, rerank
    ranks: dict = field(default_factory=dict)  # 1-based rank in each retriever's list

    def as_dict(self) -> dict:
        return {"tbl": self.tbl, "key": self.key, "tenant": self.tenant, "text": self.text, "lsn": self.lsn,
                "commit_time": self.commit_time.isoformat() if self.commit_time else None,
                "score": round(self.score, 6), "scores": {k: round(v, 6) for k, v in self.scores.items()},
                "ranks": self.ranks}


def setting(rag: dict, name: str):
    return rag.get(name, DEFAULTS[name])


def tenant_filter(config, tenant: str | None) -> tuple[sql.Composable, dict]:
    """The WHERE fragment restricting documents to what `tenant` may see (rows of shared tables too)."""
    tenant_tables = sorted(t.name for t in config.tables if t.tenant)
    shared = sorted(t.name for t in config.tables if not t.tenant)
    if tenant is None:
        if tenant_tables:
            raise TenantRequired(f"{', '.join(tenant_tables)} declare a tenant column: pass --tenant "
                                 "(pgfresh never searches across tenants)")
        return sql.SQL("true"), {}
    if not shared:
        return sql.SQL("d.tenant = %(tenant)s"), {"tenant": tenant}
    return (sql.SQL("(d.tenant = %(tenant)s or (d.tenant is null and d.tbl = any(%(shared)s::text[])))"),
            {"tenant": tenant, "shared": shared})


def search(conn, config, text: str, tenant: str | None = None, k: int = 10, mode: str | None = None, *,
           fusion: str | None = None, rerank: str | None = None, qvec=None, models=None) -> list[Hit]:
    """The k best documents for `text` that `tenant` may see, best first (`models`: who holds the
    embedder and cross-encoder, a `rag.models.Models`; default: the process's)."""
    rag = config.rag
    mode = mode or setting(rag, "mode")
    if mode not in MODES:
        raise PgfreshError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
    where, params = tenant_filter(config, tenant)
    active = active_generation(conn, config, models)
    if active is None:
        raise NotIndexed("nothing is indexed yet: run `pgfresh sync` first")
    how = rerank or setting(rag, "rerank")
    wants_vector = mode != "lexical" or how in ("auto", "embedder")
    if qvec is None and wants_vector and active.model is not None:
        qvec = active.model.embed([text])[0]
    if qvec is None and mode != "lexical":
        mode = "lexical"  # the index's embedder is gone from this installation; words still work
    n = max(int(setting(rag, "candidates")), k)
    cands = _candidates(conn, rag, active, text, mode, qvec, where, params, n)
    hits = list(cands.values())
    if mode == "hybrid":
        _fuse(hits, fusion or setting(rag, "fusion"), rag)
    else:
        for h in hits:
            h.score = h.scores["dense" if mode == "dense" else "lexical"] or 0.0
    hits.sort(key=lambda h: (-h.score, h.tbl, h.key))
    if how != "none":
        top = hits[:min(100, max(int(setting(rag, "rerank_depth")), k))]
        _rerank(top, text, how, rag, active, models)
        top.sort(key=lambda h: (-h.score, h.tbl, h.key))
        hits = top + hits[len(top):]
    return hits[:k]


def active_generation(conn, config, models=None) -> generations.Generation | None:
    active, _ = generations.live(conn)
    if active is not None:
        active.model = embed.find(config.rag, config.data_dir, active.embedder, active.version, models)
    return active


def _candidates(conn, rag, active, text, mode, qvec, where, params, n) -> dict:
    cfg = sql.Literal(setting(rag, "text_search_config"))
    p = {**params, "text": text, "bigrams": bigram_text(text), "n": n, "qvec": qvec}
    tsq = sql.SQL("%(tsq)s::tsquery")
    qlex_sql = sql.SQL("select tsvector_to_array({})").format(
        sql.SQL(TSVECTOR_SQL).format(cfg=cfg, text=sql.Placeholder("text"), bigrams=sql.Placeholder("bigrams")))
    vec = active.vector_sql()
    qv = sql.SQL("%(qvec)s::vector({})").format(sql.Literal(active.dim))
    cos = sql.SQL("1 - (c.{} <=> {})").format(vec, qv) if qvec is not None else sql.SQL("null::float8")
    # Scores every candidate gets, whichever retriever found it.
    outer = sql.SQL(
        "select c.tbl, c.key, c.tenant, c.text, c.lsn::text, c.commit_time, {cos}, ts_rank(c.tsv, q.tsq, 1),"
        " (select count(*) from unnest(%(qlex)s::text[]) l where l = any(tsvector_to_array(c.tsv)))::float8"
        " / greatest(cardinality(%(qlex)s::text[]), 1)"
        " from ({inner}) c, (select {tsq} as tsq) q"
    )
    out: dict = {}
    with conn.transaction():
        p["qlex"] = conn.execute(qlex_sql, p).fetchone()[0]
        freq, max_df = common_lexemes(conn), float(setting(rag, "lexical_max_df"))
        p["tsq"] = or_query(p["qlex"], freq, max_df)  # what ts_rank scores
        p["tsq_match"] = match_query(p["qlex"], freq, max_df, document_count(conn),  # which rows are ranked
                                     int(setting(rag, "lexical_max_rows")))
        conn.execute(sql.SQL("set local hnsw.ef_search = {}").format(
            sql.Literal(max(int(setting(rag, "ef_search")), n))))
        if _iterative_scans(conn):
            conn.execute("set local hnsw.iterative_scan = relaxed_order")
        if mode in ("dense", "hybrid"):
            # A filter that leaves few rows (a small tenant): rank them all exactly, through the tenant
            # index ("+ 0" keeps the HNSW index out): all the true neighbours, and faster than a graph
            # walk that skips 99 rows of other tenants for each one it keeps.
            exact = "tenant" in params and _filtered_rows(conn, params["tenant"]) <= int(setting(rag, "exact_max_rows"))
            inner = sql.SQL(
                "select d.*, d.{vec} <=> {qv} as dist from pgfresh.documents d"
                " where d.index_id = {gid} and d.embedding is not null and {where} order by {order} limit %(n)s"
            ).format(vec=vec, qv=qv, gid=sql.Literal(active.id), where=where,
                     order=sql.SQL("(d.{} <=> {}) + 0").format(vec, qv) if exact else sql.SQL("dist"))
            rows = conn.execute(outer.format(cos=cos, inner=inner, tsq=tsq), p).fetchall()
            _collect(out, rows, "dense", lambda r: -(r[6] if r[6] is not None else -2.0))
        if mode in ("lexical", "hybrid"):
            inner = sql.SQL(
                "select d.* from pgfresh.documents d, (select {tsq} as tsq, %(tsq_match)s::tsquery as m) q0"
                " where d.index_id = {gid} and d.tsv @@ q0.m and {where}"
                " order by ts_rank(d.tsv, q0.tsq, 1) desc, d.tbl, d.key limit %(n)s"
            ).format(tsq=tsq, gid=sql.Literal(active.id), where=where)
            rows = conn.execute(outer.format(cos=cos, inner=inner, tsq=tsq), p).fetchall()
            _collect(out, rows, "lexical", lambda r: -r[7])
    return out


_VECTOR_VERSIONS: dict[tuple, bool] = {}
_TENANT_STATS: dict[tuple, tuple[float, dict[str, float], float]] = {}


def _filtered_rows(conn, tenant: str) -> float:
    """Documents a tenant filter keeps, by ANALYZE's statistics of pgfresh.documents.tenant (its
    rows plus the shared ones without a tenant; cached a minute). Infinite before any statistics."""
    key = (conn.info.host, conn.info.port, conn.info.dbname)
    hit = _TENANT_STATS.get(key)
    if hit is None or time.monotonic() - hit[0] > 60:
        row = conn.execute(
            "select most_common_vals::text::text[], most_common_freqs, null_frac from pg_stats"
            " where schemaname = 'pgfresh' and tablename = 'documents' and attname = 'tenant'").fetchone()
        hit = _TENANT_STATS[key] = (time.monotonic(), dict(zip(row[0] or [], row[1] or [])) if row else {},
                                    row[2] if row else -1.0)
    _, freq, nulls = hit
    if nulls < 0:
        return float("inf")
    # A tenant missing from the most common values is rarer than the rarest of them.
    share = freq.get(tenant, min(freq.values(), default=0.0)) + nulls
    return share * document_count(conn)


def _iterative_scans(conn) -> bool:
    """pgvector >= 0.8 has iterative index scans; 0.7 rejects the setting (filtered queries then
    return fewer rows when the filter is selective and the planner picks the HNSW index)."""
    key = (conn.info.host, conn.info.port, conn.info.dbname)
    if key not in _VECTOR_VERSIONS:
        version = conn.execute("select extversion from pg_extension where extname = 'vector'").fetchone()[0]
        _VECTOR_VERSIONS[key] = tuple(int(x) for x in version.split(".")[:2]) >= (0, 8)
    return _VECTOR_VERSIONS[key]


def _collect(out: dict, rows: list, retriever: str, sort_key) -> None:
    for rank, r in enumerate(sorted(rows, key=lambda r: (sort_key(r), r[0], r[1])), start=1):
        hit = out.get((r[0], r[1]))
        if hit is None:
            hit = out[(r[0], r[1])] = Hit(r[0], r[1], r[2], r[3], r[4], r[5])
            hit.scores = {"dense": r[6], "lexical": r[7], "overlap": r[8]}
        hit.ranks[retriever] = rank


def _fuse(hits: list[Hit], fusion: str, rag: dict) -> None:
    wd, wl = float(setting(rag, "dense_weight")), float(setting(rag, "lexical_weight"))
    if fusion == "rrf":
        k = float(setting(rag, "rrf_k"))
        for h in hits:
            h.score = sum(w / (k + h.ranks[r]) for r, w in (("dense", wd), ("lexical", wl)) if r in h.ranks)
    elif fusion == "weighted":
        dense = [h.scores["dense"] for h in hits if h.scores["dense"] is not None]
        lo, hi = (min(dense), max(dense)) if dense else (0.0, 1.0)
        top_lex = max((h.scores["lexical"] for h in hits), default=0.0) or 1.0
        for h in hits:
            d = h.scores["dense"]
            dn = 0.0 if d is None or hi <= lo else (d - lo) / (hi - lo)
            h.score = wd * dn + wl * h.scores["lexical"] / top_lex
    else:
        raise PgfreshError(f"unknown fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
    for h in hits:
        h.scores["fused"] = h.score


def _rerank(hits: list[Hit], text: str, how: str, rag: dict, active, models=None) -> None:
    if not hits:
        return
    if how == "cross-encoder" or (how == "auto" and rag.get("rerank_model")):
        model = _cross_encoder(rag, models)
        scores = model.predict([(text, h.text) for h in hits], show_progress_bar=False)
    elif active.model is None:
        return  # no embedder for this index: the fused order stands
    else:
        scores = _embedder_scores(hits, text, active.model, rag)
    for h, s in zip(hits, scores):
        h.score = float(s)
        h.scores["rerank"] = h.score


def _embedder_scores(hits: list[Hit], text: str, model, rag: dict) -> list[float]:
    """The weighted fusion again, with the question's cosine to the *whole* document (its best
    chunk, where the stored vector saw only the beginning: past the embedder's token limit) and a
    bonus for the share of the question's words the document contains."""
    best = [h.scores["dense"] for h in hits]
    counts = model.count_tokens([h.text for h in hits]) if hasattr(model, "count_tokens") else [0] * len(hits)
    long = [i for i, c in enumerate(counts) if c > model.max_tokens - 2 or best[i] is None]
    if long:
        chunks, owner = [], []
        for i in long:
            for c in _chunks(hits[i].text, model.max_tokens):
                chunks.append(c)
                owner.append(i)
        vecs = model.embed([text] + chunks)
        for i in long:
            best[i] = None
        for i, s in zip(owner, vecs[1:] @ vecs[0]):
            best[i] = float(s) if best[i] is None else max(best[i], float(s))
        for i in long:
            hits[i].scores["dense_whole"] = best[i]
    wd, wl = float(setting(rag, "dense_weight")), float(setting(rag, "lexical_weight"))
    wo = float(setting(rag, "rerank_overlap_weight"))
    lo, hi = min(b for b in best if b is not None), max(b for b in best if b is not None)
    top_lex = max(h.scores["lexical"] for h in hits) or 1.0
    return [wd * (0.0 if b is None or hi <= lo else (b - lo) / (hi - lo)) + wl * h.scores["lexical"] / top_lex
            + wo * h.scores["overlap"] for b, h in zip(best, hits)]


def _chunks(text: str, max_tokens: int) -> list[str]:
    """Overlapping word windows short enough for the embedder (a word is ~1.3 word pieces)."""
    words = text.split()
    size = max(16, int(max_tokens / 1.5))
    if len(words) <= size:
        return [text]
    step = max(8, size * 3 // 4)
    starts = list(range(0, len(words) - size + 1, step))
    if starts[-1] + size < len(words):
        starts.append(len(words) - size)  # the tail gets a window of its own
    return [" ".join(words[i:i + size]) for i in starts]


def _cross_encoder(rag: dict, models=None):
    from pgfresh.rag.models import process

    path = rag.get("rerank_model")
    if not path:
        raise PgfreshError("rag.rerank = 'cross-encoder' needs rag.rerank_model (a local cross-encoder directory)")

    def build():
        from sentence_transformers import CrossEncoder

        return CrossEncoder(path, device="cpu")

    return (models if models is not None else process()).get("cross-encoder", path, build)


def exact_dense(conn, config, qvec, tenant: str | None, k: int) -> list[tuple[str, str, float]]:
    """Exact k nearest neighbours (no index) as (tbl, key, cosine): the yardstick for HNSW recall."""
    where, params = tenant_filter(config, tenant)
    active = active_generation(conn, config)
    query = sql.SQL(
        "select d.tbl, d.key, 1 - (d.embedding <=> %(qvec)s::vector) from pgfresh.documents d"
        " where d.index_id = {gid} and d.embedding is not null"
        " and {where} order by (d.embedding <=> %(qvec)s::vector) + 0, d.tbl, d.key limit %(k)s"
    ).format(gid=sql.Literal(active.id), where=where)
    with conn.transaction():
        conn.execute("set local enable_indexscan = off")
        return [tuple(r) for r in conn.execute(query, {**params, "qvec": qvec, "k": k})]
