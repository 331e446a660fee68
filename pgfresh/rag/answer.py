"""`ask`: retrieve, prompt the reader with the documents, answer with the source rows it used.

The answer cache sits in front: an exact or similar question of the same tenant and reader, whose
source rows have not changed since, is answered from the cache. Without a configured reader `ask`
says so and returns the retrieved rows (still cached, keyed on "no reader").
"""

from __future__ import annotations

import time

from pgfresh import db
from pgfresh.errors import PgfreshError
from pgfresh.rag import cache, question as questions, reader as readers, retrieval

ASK_MODES = ("rag", "tuned", "hybrid")
NO_READER = ("no reader is configured: add [rag.reader] to pgfresh.toml (kind = 'openai' with base_url and model, "
             "or kind = 'hf' with path); showing the retrieved rows")


def prompt_for(question: str, contexts: list[str], reader=None) -> str:
    """The open-book prompt: the built-in model's own format when it is the reader, else a plain one."""
    if isinstance(reader, readers.HFReader):
        try:
            from pgfresh.model import format_prompt
        except ImportError:
            format_prompt = None
        if format_prompt is not None:
            return format_prompt(question, contexts)
    docs = "\n\n".join(f"[{i}] {c}" for i, c in enumerate(contexts, start=1))
    return ("Answer the question using only the documents below. If they do not contain the answer, "
            "say that you do not know.\n\n"
            f"Documents:\n{docs}\n\nQuestion: {question}\nAnswer:")


def ask(config, question: str, tenant: str | None = None, mode: str = "rag", *, k: int | None = None,
        environ: dict | None = None) -> dict:
    """Answer `question` for `tenant`; returns answer, sources (rows with table, key, LSN), cache, timings."""
    questions.check(question, tenant=tenant, k=k)  # every mode, before anything loads or connects
    if mode not in ASK_MODES:
        raise PgfreshError(f"unknown ask mode {mode!r}: use one of {', '.join(ASK_MODES)}")
    if mode != "rag":
        return _delegate(config, question, tenant, mode)
    rag = config.rag
    retrieval.tenant_filter(config, tenant)  # refuse a tenant-less question before anything else
    reader = readers.from_config(rag, base_dir=config.path.parent, environ=environ)
    reader_id = reader.id if reader else ""
    cache_cfg = rag.get("cache", {})
    use_cache = cache_cfg.get("enabled", True)
    t0 = time.perf_counter()
    from pgvector.psycopg import register_vector

    with db.connect(db.store_dsn(config), "ask", autocommit=True) as conn:
        register_vector(conn)
        active = retrieval.active_generation(conn, config)
        if active is None:
            raise retrieval.NotIndexed("nothing is indexed yet: run `pgfresh sync` first")
        qvec = active.model.embed([question])[0] if active.model is not None else None
        if use_cache:
            hit = cache.lookup(conn, tenant or "", reader_id, question, qvec, active.id,
                               float(cache_cfg.get("similarity", 0.97)))
            if hit is not None:
                return {**hit, "cache": "hit", "timings": {"total_ms": _ms(t0)}}
        t1 = time.perf_counter()
        hits = retrieval.search(conn, config, question, tenant, k=k or int(rag.get("ask_k", 4)),
                             mode=rag.get("ask_search_mode"), qvec=qvec)
        t2 = time.perf_counter()
        answer = None
        if reader is not None and hits:
            answer = reader.generate(prompt_for(question, [h.text for h in hits], reader),
                                     int(rag.get("max_new_tokens", (rag.get("reader") or {}).get("max_new_tokens", 64))))
        elif reader is not None:
            answer = "No indexed document matches this question."
        result = {"question": question, "tenant": tenant, "mode": "rag", "answer": answer,
                  "reader": reader_id or None, "note": None if reader else NO_READER,
                  "sources": [h.as_dict() for h in hits]}
        if use_cache:
            cache.store(conn, tenant or "", reader_id, question, qvec, active.id, result,
                        [(h.tbl, h.key, h.lsn) for h in hits])
    return {**result, "cache": "miss" if use_cache else "off",
            "timings": {"retrieve_ms": round((t2 - t1) * 1000, 1), "generate_ms": _ms(t2), "total_ms": _ms(t0)}}


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)


def _delegate(config, question: str, tenant: str | None, mode: str) -> dict:
    """`--mode tuned|hybrid` belong to the training stage (pgfresh.train.answer)."""
    try:
        from pgfresh import train
    except ImportError:
        train = None
    fn = getattr(train, "answer", None)
    if fn is None:
        raise PgfreshError(f"ask --mode {mode} needs the training stage (pgfresh.train.answer), which this "
                           "installation does not have yet; use --mode rag")
    return fn(config, question, tenant=tenant, mode=mode)
