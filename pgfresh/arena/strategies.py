"""The built-in arena strategies: one reader model, five ways for live data to reach it.

Every strategy answers with the same model, the built-in one pgfresh builds on the snapshot (or
`train.base_model`), so only the way knowledge arrives differs:

- `stale`: that base model, closed-book, never updated: what the snapshot taught it.
- `rag-dense`: dense retrieval (pgvector HNSW) of the top `k` documents, then the model answers
  open-book from them.
- `rag-hybrid`: hybrid retrieval (vector + full text, fused) and the rerank stage, then open-book.
- `tuned`: the tenant's continual slice, closed-book; `refresh` runs the training rounds that are
  due (`pgfresh train --once`), so its time-to-fresh includes training.
- `hybrid`: a router, per question. It retrieves the best-matching row (hybrid search, top 1) and
  compares the row's LSN with the LSN the tenant's slice knows: if the slice has seen this row's
  current version it answers closed-book from the slice (no context, faster); if the row changed
  after the slice was trained, or no slice exists, it answers open-book from the retrieved
  documents. The route taken is recorded in each answer's sources (`route:slice` / `route:rag`).

All of them see the gated data (the quality gate is on); `pgfresh arena --gate off` compares a run
without it.
"""

from __future__ import annotations

import threading
import time

from pgfresh.arena.strategy import Answer, ArenaContext, Question, Strategy

K = 4  # documents in an open-book prompt (as `pgfresh ask`)
MAX_NEW_TOKENS = 24

_MODEL_LOCK = threading.Lock()
_BASE: dict[str, object] = {}  # model directory -> loaded base model, shared by the strategies of a run


def ensure_base_model(ctx: ArenaContext, console=None):
    """Build the built-in model on the current snapshot if needed; return it loaded (shared)."""
    from pgfresh import model

    path = model.base_dir(ctx.config)
    with _MODEL_LOCK:
        if str(path) not in _BASE:
            if not ctx.config.train.get("base_model") and not (path / model.META_FILE).exists():
                model.build(ctx.config, console=console or ctx.console)
            _BASE[str(path)] = model.load(path)
        return _BASE[str(path)]


def forget_base_models() -> None:
    with _MODEL_LOCK:
        _BASE.clear()


class _Reader:
    """Shared pieces: the loaded base model and a connection for retrieval."""

    def _load(self, ctx: ArenaContext) -> None:
        from pgvector.psycopg import register_vector

        from pgfresh import db

        self.config = ctx.config
        self.loaded = ensure_base_model(ctx)
        self.conn = db.connect(ctx.store_dsn or ctx.dsn, f"arena-{self.name}", autocommit=True, database="store")
        register_vector(self.conn)

    def _generate(self, prompt: str) -> str:
        from pgfresh.model import generate

        return generate(self.loaded, [prompt], max_new_tokens=MAX_NEW_TOKENS)[0]

    def _retrieve(self, question: Question, mode: str, rerank: str | None, k: int = K):
        from pgfresh.rag import retrieval

        return retrieval.search(self.conn, self.config, question.text, question.tenant, k=k, mode=mode, rerank=rerank)

    def _open_book(self, question: Question, hits) -> str:
        from pgfresh.model import format_prompt

        return self._generate(format_prompt(question.text, [h.text for h in hits]))

    def close(self) -> None:
        if getattr(self, "conn", None) is not None:
            self.conn.close()
            self.conn = None


class Stale(_Reader, Strategy):
    kind, gate = "stale", None

    def prepare(self, ctx: ArenaContext) -> None:
        self._load(ctx)

    def answer(self, question: Question) -> Answer:
        from pgfresh.model import format_prompt

        t0 = time.perf_counter()
        text = self._generate(format_prompt(question.text))
        return Answer(text, time.perf_counter() - t0, sources=["base model"])


class Rag(_Reader, Strategy):
    kind, gate = "rag", True

    def __init__(self, mode: str, rerank: str | None):
        self.mode, self.rerank = mode, rerank

    def prepare(self, ctx: ArenaContext) -> None:
        self._load(ctx)

    def answer(self, question: Question) -> Answer:
        t0 = time.perf_counter()
        hits = self._retrieve(question, self.mode, self.rerank)
        text = self._open_book(question, hits) if hits else ""
        return Answer(text, time.perf_counter() - t0, sources=[f"{h.tbl}{h.key}" for h in hits],
                      retrieved_keys=[(h.tbl, h.key) for h in hits])


class Tuned(Strategy):
    kind, gate = "tuned", True

    def prepare(self, ctx: ArenaContext) -> None:
        from pgfresh import train

        self.config = ctx.config
        ensure_base_model(ctx)
        train.run(ctx.config, once=True)  # version 1 of every slice: the facts waiting now

    def refresh(self, ctx: ArenaContext) -> None:
        from pgfresh import train

        # Only the rounds that are due (enough new facts, or waited long; back-off after a rejection).
        train.run(ctx.config, once=True, due_only=True)

    def answer(self, question: Question) -> Answer:
        from pgfresh import train

        t0 = time.perf_counter()
        out = train.ask_tuned(self.config, question.text, question.tenant)
        return Answer(out["answer"], time.perf_counter() - t0, sources=[f"slice {out['slice']} v{out['version']}"])


class Hybrid(_Reader, Strategy):
    kind, gate = "hybrid", True

    def prepare(self, ctx: ArenaContext) -> None:
        self._load(ctx)  # the tuned strategy (same data directory) trains the slices this one reads

    def answer(self, question: Question) -> Answer:
        from pgfresh import train
        from pgfresh.capture.pgoutput import parse_lsn
        from pgfresh.errors import PgfreshError

        t0 = time.perf_counter()
        hits = self._retrieve(question, "hybrid", None)
        slice_lsn = self._slice_lsn(question.tenant)
        fresh_enough = hits and slice_lsn is not None and parse_lsn(hits[0].lsn) <= slice_lsn
        if fresh_enough or (not hits and slice_lsn is not None):
            try:
                out = train.ask_tuned(self.config, question.text, question.tenant)
                return Answer(out["answer"], time.perf_counter() - t0, sources=["route:slice", f"v{out['version']}"],
                              retrieved_keys=[(h.tbl, h.key) for h in hits])
            except PgfreshError:
                pass  # no loadable slice: retrieval answers
        text = self._open_book(question, hits) if hits else ""
        return Answer(text, time.perf_counter() - t0, sources=["route:rag"] + [f"{h.tbl}{h.key}" for h in hits],
                      retrieved_keys=[(h.tbl, h.key) for h in hits])

    def _slice_lsn(self, tenant: str | None) -> int | None:
        from pgfresh.capture.pgoutput import parse_lsn
        from pgfresh.train import slice_of

        row = self.conn.execute(
            "select v.lsn::text from pgfresh.slice_versions v join pgfresh.slices s on s.name = v.slice"
            " and s.current_version = v.version where s.name = %s", (slice_of(tenant),)).fetchone()
        return parse_lsn(row[0]) if row and row[0] else None


def stale(ctx: ArenaContext) -> Strategy:
    return Stale()


def rag_dense(ctx: ArenaContext) -> Strategy:
    return Rag("dense", "none")


def rag_hybrid(ctx: ArenaContext) -> Strategy:
    return Rag("hybrid", None)  # the configured rerank (default: embedder re-scoring + overlap)


def tuned(ctx: ArenaContext) -> Strategy:
    return Tuned()


def hybrid(ctx: ArenaContext) -> Strategy:
    return Hybrid()
