"""The rag stage: a hybrid index kept current by the change log, search, answers, and an answer cache.

Public entry points:
- the 'index' worker that `pgfresh sync` drives (pgfresh.rag.index, registered in `pgfresh.stages`);
- `search(conn, config, text, tenant, k, mode) -> list[Hit]` (pgfresh.rag.retrieval);
- `ask(config, question, tenant, mode)`: a shim over `pgfresh.serve.answer`, the one answer path;
- `status_counts(conn)` for `pgfresh status`; `check_config(config)` for the `[rag]` section.
"""

from __future__ import annotations

import re

from pgvector.psycopg import register_vector

from pgfresh import db
from pgfresh.configtypes import check_section, number
from pgfresh.rag import embed, reader, status
from pgfresh.rag.question import check
from pgfresh.rag.retrieval import FUSIONS, MODES, RERANKS, Hit, search, tenant_filter  # noqa: F401  (re-exported)

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# key -> (kind, check, expected): every key `[rag]` accepts, with what it must be.
_NUM = (int, float)
_SPEC = {
    "enabled": (bool, None, "true or false"),
    "embedder": (str, None, "an embedder name: minilm, static-minilm (or any name with embedder_path)"),
    "embedder_path": (str, None, "a sentence-transformers model directory"),
    "device": (str, lambda v: bool(_DEVICE.match(v)), "auto, cpu, cuda, cuda:N or mps"),
    "embed_batch": (int, lambda v: v > 0, "a positive integer (texts per embedder call)"),
    "embed_threads": (int, lambda v: v >= 0, "an integer >= 0 (CPU threads for the embedder; 0: torch's default)"),
    "index_batch_changes": (int, lambda v: v > 0, "a positive integer (changes per admit transaction)"),
    "index_batch_docs": (int, lambda v: v > 0, "a positive integer (documents per apply transaction)"),
    "hnsw_m": (int, lambda v: 2 <= v <= 100, "an integer in 2..100"),
    "hnsw_ef_construction": (int, lambda v: 4 <= v <= 1000, "an integer in 4..1000"),
    "ef_search": (int, lambda v: 1 <= v <= 1000, "an integer in 1..1000"),
    "text_search_config": (str, lambda v: bool(re.match(r"^[a-z_][a-z0-9_]*$", v)), "a text search configuration like 'english'"),
    "lexical_max_df": (_NUM, lambda v: 0 < v <= 1, "a fraction in (0, 1] (words in more documents are left out of lexical matching)"),
    "exact_max_rows": (int, lambda v: v >= 0, "an integer >= 0 (a tenant filter keeping at most this many documents ranks them exactly)"),
    "lexical_max_rows": (int, lambda v: v > 0, "a positive integer (rows a lexical query may match and rank)"),
    "mode": (str, lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "ask_search_mode": (str, lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "fusion": (str, lambda v: v in FUSIONS, f"one of {', '.join(FUSIONS)}"),
    "rrf_k": (_NUM, lambda v: v > 0, "a number > 0"),
    "dense_weight": (_NUM, lambda v: v >= 0, "a number >= 0"),
    "lexical_weight": (_NUM, lambda v: v >= 0, "a number >= 0"),
    "candidates": (int, lambda v: 1 <= v <= 1000, "an integer in 1..1000"),
    "rerank": (str, lambda v: v in RERANKS, f"one of {', '.join(RERANKS)}"),
    "rerank_depth": (int, lambda v: 1 <= v <= 100, "an integer in 1..100"),
    "rerank_overlap_weight": (_NUM, lambda v: v >= 0, "a number >= 0"),
    "rerank_model": (str, None, "a local cross-encoder model directory"),
    "k": (int, lambda v: v > 0, "a positive integer (search results)"),
    "ask_k": (int, lambda v: v > 0, "a positive integer (documents in the prompt)"),
    "max_new_tokens": (int, lambda v: v > 0, "a positive integer"),
    "reader": (dict, None, "a table ([rag.reader])"),
    "cache": (dict, None, "a table ([rag.cache])"),
}
_CACHE_SPEC = {"enabled": (bool, None, "true or false"),
               "similarity": number(0, 1, above=True, unit="1: exact matches only")}


def check_config(config) -> list[str]:
    """Every problem in `[rag]`, each starting with its key path."""
    rag, problems = config.rag, []
    check_section(rag, "rag", _SPEC, problems)
    if isinstance(rag.get("embedder"), str) and not rag.get("embedder_path") and rag["embedder"] not in embed.BUILTIN:
        problems.append(f"rag.embedder: expected one of {', '.join(embed.BUILTIN)} (or set rag.embedder_path), "
                        f"got {rag['embedder']!r}")
    if rag.get("rerank") == "cross-encoder" and not rag.get("rerank_model"):
        problems.append("rag.rerank: 'cross-encoder' needs rag.rerank_model (a local cross-encoder directory)")
    if isinstance(rag.get("reader"), dict):
        reader.check(rag["reader"], problems)
    if isinstance(rag.get("cache"), dict):
        check_section(rag["cache"], "rag.cache", _CACHE_SPEC, problems)
    return problems


def ask(config, question: str, tenant: str | None = None, mode: str = "rag", **kw) -> dict:
    """Kept for existing callers: forwards to `pgfresh.serve.answer` (rag/answer.py)."""
    # Imported here, not at the top: serve is a later stage that imports rag; new code calls serve.
    from pgfresh.rag.answer import ask as _ask

    return _ask(config, question, tenant, mode, **kw)


def status_counts(conn) -> dict:
    """Documents, queue, generations, freshness p50/p99 and cache counters, for `pgfresh status`."""
    return status.counts(conn)


def run_search(config, text: str, tenant: str | None = None, k: int | None = None, mode: str | None = None) -> list[Hit]:
    """`search` on a connection of its own (the form the CLI and the HTTP API use)."""
    check(text, tenant=tenant, k=k, what="search text")
    tenant_filter(config, tenant)  # refuse before connecting
    with db.connect(db.store_dsn(config), "search", autocommit=True) as conn:
        register_vector(conn)
        return search(conn, config, text, tenant, k or int(config.rag.get("k", 10)), mode)
