"""`answer(config, question, tenant, mode)`: the one answer path of the CLI, the HTTP API and the arena.

Modes:
- `rag`: retrieve (`rag.ask_k` documents, `rag.ask_search_mode`), then the configured reader answers
  open-book; the answer cache sits in front (an exact or similar question of the same tenant and
  reader whose source rows have not changed since is answered from it).
- `tuned`: the tenant's published slice answers closed-book.
- `hybrid`: retrieval runs, the router (pgfresh.serve.router) judges the row the question is about
  (the one it names by a fact's phrasing, looked up among the tenant's facts, else the best hit),
  picks the slice or the documents, and the answer says which and why.

Every answer is a dict with the same keys (docs/SERVE.md): `answer`, `mode`, `route` (taken,
reason), `sources` (rows with table, key, LSN, commit time: the lineage), `slice` (name, version,
LSN, or null), `cache` (hit, miss or off), `reader`, `note`, `timings` (milliseconds per step).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pgfresh import render
from pgfresh.errors import PgfreshError
from pgfresh.rag.question import check as question_check
from pgfresh.serve import router
from pgfresh.serve.registry import Registry

MODES = ("rag", "tuned", "hybrid")
NO_READER = ("no reader is configured: add [rag.reader] to pgfresh.toml (kind = 'builtin', kind = 'openai' with "
             "base_url and model, or kind = 'hf' with path); showing the retrieved rows")
NO_MATCH = "No indexed document matches this question."
TUNED_MAX_NEW_TOKENS = 32


class UnknownMode(PgfreshError):
    """An answer mode other than rag, tuned or hybrid."""


@dataclass
class Options:
    """Per-call settings; None everywhere means what `pgfresh.toml` says (what users get)."""

    k: int | None = None  # documents in the prompt (rag.ask_k, 4)
    search_mode: str | None = None  # dense, lexical or hybrid (rag.ask_search_mode, else rag.mode)
    rerank: str | None = None  # rag.rerank
    cache: bool | None = None  # rag.cache.enabled (the arena switches it off)
    max_new_tokens: int | None = None
    environ: dict | None = None  # where the reader's API key variable is read (os.environ)


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The process's registry for callers that do not pass one (the CLI makes one per command)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry()
    return _DEFAULT


def prompt_for(question: str, contexts: list[str], reader=None) -> str:
    """The open-book prompt: a local model's own (`pgfresh.model.prompt_for`: its chat template, or
    the built-in format) when it reads, else a plain one for an endpoint."""
    from pgfresh.rag import reader as readers

    if getattr(reader, "builtin", False) or isinstance(reader, readers.HFReader):
        try:
            from pgfresh.model import prompt_for as model_prompt
        except ImportError:
            model_prompt = None
        if model_prompt is not None:
            return model_prompt(reader.prompt_tokenizer, question, contexts)
    docs = "\n\n".join(f"[{i}] {c}" for i, c in enumerate(contexts, start=1))
    return ("Answer the question using only the documents below. If they do not contain the answer, "
            "say that you do not know.\n\n"
            f"Documents:\n{docs}\n\nQuestion: {question}\nAnswer:")


def answer(config, question: str, tenant: str | None = None, mode: str = "rag", *,
           options: Options | None = None, registry: Registry | None = None) -> dict:
    """Answer `question` for `tenant` in `mode` (see the module docstring for the result)."""
    from pgfresh.rag import retrieval

    if mode not in MODES:
        raise UnknownMode(f"unknown ask mode {mode!r}: use one of {', '.join(MODES)}")
    opts, reg = options or Options(), registry or default_registry()
    question_check(question, tenant=tenant, k=opts.k)  # every mode, before anything loads or connects
    retrieval.tenant_filter(config, tenant)  # refuse a tenant-less question on tenant tables, in every mode
    _stages_configured(config, mode)
    t0 = time.perf_counter()
    with reg.connection(config, "ask") as conn:
        if mode == "tuned":
            out = _tuned(config, conn, reg, question, tenant,
                         router.Route(router.SLICE, "mode tuned: the slice answers closed-book"))
        elif mode == "rag":
            out = _rag(config, conn, reg, question, tenant, opts)
            out["route"] = router.Route(router.RETRIEVE, "mode rag: retrieval answers").as_dict()
        else:
            out = _hybrid(config, conn, reg, question, tenant, opts)
    out.update(question=question, tenant=tenant, mode=mode)
    out["timings"]["total_ms"] = _ms(t0)
    return out


def _stages_configured(config, mode: str) -> None:
    """Refuse, before connecting, a mode whose stage this config does not run (it would never be ready)."""
    needs = {"rag": ("rag",), "tuned": ("train",), "hybrid": ("rag",)}  # hybrid without a slice is rag
    missing = [s for s in needs[mode] if s not in config.sections]
    if missing:
        usable = [m for m, stages in needs.items() if all(s in config.sections for s in stages)]
        instead = f", or use --mode {usable[0]}" if usable else ""
        raise PgfreshError(f"ask --mode {mode} needs a [{'] and ['.join(missing)}] section in {config.path}, "
                           f"which has none: add it and run `pgfresh sync`{instead}")


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)


def _rag(config, conn, reg, question, tenant, opts: Options, qvec=None, hits=None, timings=None) -> dict:
    """Open-book: cache, retrieve (unless `hits` are given), generate, store in the cache."""
    from pgfresh.rag import cache, retrieval

    rag = config.rag
    timings = dict(timings or {})
    reader = reg.reader(config, opts.environ)
    reader_id = reader.id if reader else ""
    cache_cfg = rag.get("cache", {})
    use_cache = cache_cfg.get("enabled", True) if opts.cache is None else opts.cache
    t = time.perf_counter()
    active = retrieval.active_generation(conn, config, reg.models)
    if active is None:
        raise retrieval.NotIndexed("nothing is indexed yet: run `pgfresh sync` first")
    if qvec is None and active.model is not None:
        qvec = active.model.embed([question])[0]
        timings["embed_ms"] = _ms(t)
    if use_cache:
        t = time.perf_counter()
        hit = cache.lookup(conn, tenant or "", reader_id, question, qvec, active.id,
                           float(cache_cfg.get("similarity", 0.97)))
        timings["cache_ms"] = _ms(t)
        if hit is not None:
            return {**hit, "cache": "hit", "timings": timings}
    if hits is None:
        t = time.perf_counter()
        hits = _search(config, conn, reg, question, tenant, opts, qvec)
        timings["retrieve_ms"] = _ms(t)
    t = time.perf_counter()
    text = None
    if reader is not None and hits:
        limit = opts.max_new_tokens or int(rag.get("max_new_tokens", (rag.get("reader") or {}).get("max_new_tokens", 64)))
        text = reader.generate(prompt_for(question, [h.text for h in hits], reader), limit)
    elif reader is not None:
        text = NO_MATCH
    timings["generate_ms"] = _ms(t)
    result = {"answer": text, "reader": reader_id or None, "note": None if reader else NO_READER,
              "sources": [h.as_dict() for h in hits], "slice": None}
    if use_cache:
        cache.store(conn, tenant or "", reader_id, question, qvec, active.id, result,
                    [(h.tbl, h.key, h.lsn) for h in hits])
    return {**result, "cache": "miss" if use_cache else "off", "timings": timings}


def _search(config, conn, reg, question, tenant, opts: Options, qvec):
    from pgfresh.rag import retrieval

    rag = config.rag
    return retrieval.search(conn, config, question, tenant, k=opts.k or int(rag.get("ask_k", 4)),
                            mode=opts.search_mode or rag.get("ask_search_mode"), rerank=opts.rerank, qvec=qvec,
                            models=reg.models)


def _published(conn, tenant):
    """The tenant's published slice version, or None (no slice, or the training stage not installed)."""
    try:
        from pgfresh.train import slice_of, slices
    except ImportError:
        return None
    from psycopg import errors as pgerr

    try:
        return slices.current(conn, slice_of(tenant))
    except pgerr.UndefinedTable:
        return None


def _tuned(config, conn, reg, question, tenant, route: router.Route, version=None, timings=None) -> dict:
    """Closed-book from the tenant's published slice, loaded through the registry."""
    from pgfresh.train import slice_of

    timings = dict(timings or {})
    try:
        from pgfresh.model import generate, prompt_for
        from pgfresh.train.slices import SliceError
    except ImportError:
        raise PgfreshError("ask --mode tuned needs the training stage: pip install 'pgfresh[train]'") from None
    version = version or _published(conn, tenant)
    if version is None:
        raise SliceError(f"no published slice for {'tenant ' + repr(tenant) if tenant else 'shared facts'} "
                         f"({slice_of(tenant)}) yet; run `pgfresh model build` and `pgfresh train --once`")
    t = time.perf_counter()
    version, loaded, lock, warning = reg.slice_model(config, conn, version)
    timings["load_ms"] = _ms(t)
    t = time.perf_counter()
    with lock:
        text = generate(loaded, [prompt_for(loaded, question)], max_new_tokens=TUNED_MAX_NEW_TOKENS)[0]
    timings["generate_ms"] = _ms(t)
    out = {"answer": text, "reader": f"slice:{version.slice}:v{version.version}", "sources": [], "cache": "off",
           "slice": {"name": version.slice, "version": version.version, "lsn": version.lsn, "base_id": version.base_id},
           "note": f"closed-book: slice {version.slice} version {version.version}, knows LSN {version.lsn}",
           "route": route.as_dict(), "timings": timings}
    if warning:
        out["warning"] = warning
    return out


def _same_answers(config, tbl: str, key: str, facts: list, newer: list) -> bool:
    """Whether a version of row (tbl, key) the facts stage has not taken in yet (`newer`: [op, row])
    gives the facts [[template, answer], ...] the same answers (a stock update leaves the category)."""
    op, row = newer
    if op not in ("insert", "update", "read") or not row or not facts:
        return False
    try:
        table = config.table(tbl)
        return all(render.fact_answer(table, name, row, json.loads(key)) == answer for name, answer in facts)
    except (KeyError, render.RenderError):
        return False


def _named_rows(conn, question: str, tenant: str | None) -> list[tuple[str, str]]:
    """The rows (tbl, key) the tenant may read with an active trainable fact phrased as `question`
    (case, spaces and punctuation aside: pgfresh.phrasing_key, through migration 018's index)."""
    return [(tbl, key) for tbl, key in conn.execute(
        "select distinct tbl, key from pgfresh.facts where status = 'active' and kind in ('qa', 'gone')"
        " and pgfresh.phrasing_keys(question, paraphrases) @> array[pgfresh.phrasing_key(%s)]"
        " and (tenant is null or tenant = %s) limit 10", (question, tenant))]


def _row_hit(conn, tbl: str, key: str):
    """A row retrieval did not return, as a hit without text, from the row store or, once retention
    pruned a deleted row's tombstone, from its newest active fact (None: neither has it)."""
    from pgfresh.rag.retrieval import Hit

    found = conn.execute(
        "(select 0, r.tenant, r.lsn::text, r.commit_time from pgfresh.tables t join pgfresh.rows r"
        "  on r.pipeline = t.pipeline and r.tbl = t.tbl where t.tbl = %(tbl)s and r.key = %(key)s)"
        " union all (select 1, tenant, lsn::text, commit_time from pgfresh.facts where tbl = %(tbl)s and key = %(key)s"
        "  and status = 'active' order by lsn desc limit 1) order by 1 limit 1", {"tbl": tbl, "key": key}).fetchone()
    return None if found is None else Hit(tbl, key, found[1], "", found[2], found[3])


def _hybrid(config, conn, reg, question, tenant, opts: Options) -> dict:
    """Retrieve, ask the router, answer by the route it picks (retrieval if the slice cannot load)."""
    from pgfresh.rag import retrieval

    timings = {}
    t = time.perf_counter()
    active = retrieval.active_generation(conn, config, reg.models)
    if active is None:
        raise retrieval.NotIndexed("nothing is indexed yet: run `pgfresh sync` first")
    qvec = active.model.embed([question])[0] if active.model is not None else None
    hits = _search(config, conn, reg, question, tenant, opts, qvec)
    timings["retrieve_ms"] = _ms(t)
    version = _published(conn, tenant)

    def table_changes(tbl: str, lsn: str, limit: int) -> int:
        # pgfresh.rows, not the change log: the log is pruned once every consumer has read it
        return conn.execute("select count(*) from (select 1 from pgfresh.rows where tbl = %s and lsn > %s::pg_lsn"
                            " limit %s) c", (tbl, lsn, limit)).fetchone()[0]

    def row_lsn(tbl: str, key: str) -> router.RowState | None:
        # The row's latest change and its pipeline (a stored table belongs to one pipeline:
        # primary-key lookups); whether the slice's lineage knows the row as it stands (rule 4): it
        # trained (base or learn, not unlearnt since) the active trainable facts the question asks
        # (those whose phrasings it matches; all of the row's if none), and a newer version of the
        # row the facts stage has not taken in yet (unread in the change log, or settling in the
        # training gate) gives them the same answers; whether the question is one of the row's
        # fact phrasings (rule 4b).
        found = conn.execute(
            "with recursive chain (version) as (select %(version)s::int union all select v.parent from chain c"
            " join pgfresh.slice_versions v on v.slice = %(slice)s and v.version = c.version where v.parent is not null),"
            # a deleted row's tombstone goes with retention, its 'gone' facts stay: their LSN then
            " r as (select t.pipeline, t.tbl, %(key)s::text as key, coalesce((select r.lsn from pgfresh.rows r"
            "  where r.pipeline = t.pipeline and r.tbl = t.tbl and r.key = %(key)s), (select max(f.lsn)"
            "  from pgfresh.facts f where f.tbl = t.tbl and f.key = %(key)s and f.status = 'active')) as lsn"
            "  from pgfresh.tables t where t.tbl = %(tbl)s),"
            " f as (select f.template, f.answer,"
            "  pgfresh.phrasing_key(%(question)s) = any(pgfresh.phrasing_keys(f.question, f.paraphrases)) as asked,"
            "  coalesce((select max(t.version) filter (where t.role in ('base', 'learn'))"
            "   > coalesce(max(t.version) filter (where t.role = 'update'), -1) from pgfresh.fact_training t"
            "   where t.fact_id = f.fact_id and t.slice = %(slice)s and t.version in (select version from chain)), false)"
            "   as learnt"
            "  from r join pgfresh.facts f on f.tbl = r.tbl and f.key = r.key"
            "  where f.status = 'active' and f.kind in ('qa', 'gone'))"  # what rounds train (train.data.TRAINABLE)
            " select r.lsn::text, r.pipeline, exists (select 1 from f where asked),"
            "  coalesce((select bool_and(learnt) from f where asked), (select bool_and(learnt) from f), false),"
            "  coalesce((select jsonb_agg(jsonb_build_array(template, answer)) from f where asked),"
            "   (select jsonb_agg(jsonb_build_array(template, answer)) from f)),"
            "  coalesce((select jsonb_build_array(c.op, c.row) from pgfresh.changes c where c.pipeline = r.pipeline"
            "   and c.seq > coalesce((select k.seq from pgfresh.consumers k where k.pipeline = r.pipeline"
            "   and k.name = 'facts'), 0) and c.tbl = r.tbl and c.key = r.key order by c.seq desc limit 1),"
            "   (select jsonb_build_array(g.op, g.row) from pgfresh.gate_pending g where g.path = 'train'"
            "   and g.tbl = r.tbl and g.key = r.key))"
            " from r where r.lsn is not null",
            {"version": -1 if version is None else version.version, "slice": "" if version is None else version.slice,
             "tbl": tbl, "key": key, "question": question}).fetchone()
        if found is None:
            return None
        lsn, pipeline, asked, learnt, facts, newer = found
        knows = learnt and (newer is None or _same_answers(config, tbl, key, facts or [], newer))
        return router.RowState(lsn, pipeline, knows, asked)

    # The row the router judges: the one the question names (phrased as one of its facts), the first
    # such hit, or the only such row when retrieval missed it (a deleted row has no document);
    # otherwise the best hit.
    named = _named_rows(conn, question, tenant) if version is not None else []
    best = next((h for h in hits if (h.tbl, h.key) in named), None)
    runner_up = next((h for h in hits[:2] if h is not best), None)
    missed = _row_hit(conn, *named[0]) if best is None and len(named) == 1 else None
    if missed is not None:
        best, runner_up = missed, None  # identified by its phrasing alone
    best = best or (hits[0] if hits else None)
    decision = router.route(router.Policy.from_config(config), best, version, table_changes,
                            runner_up=runner_up, row_lsn=row_lsn)
    if decision.taken == router.SLICE:
        from pgfresh.train.slices import SliceError

        try:
            out = _tuned(config, conn, reg, question, tenant, decision, version, timings)
            judged = [] if best is None or best in hits else [best]
            out["sources"] = [h.as_dict() for h in hits + judged]  # what the router compared, for lineage
            return out
        except SliceError as exc:
            decision = router.Route(router.RETRIEVE, f"the slice cannot be loaded ({exc}): retrieval answers", 1.0,
                                    decision.signals)
    out = _rag(config, conn, reg, question, tenant, opts, qvec=qvec, hits=hits, timings=timings)
    out["route"] = decision.as_dict()
    return out
