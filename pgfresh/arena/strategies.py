"""The built-in arena strategies: thin adapters over `pgfresh.serve.answer`, the path users run.

Every strategy answers with the same model, the base model pgfresh builds on the snapshot (or
`train.base_model`), so only the way knowledge arrives differs. Unless `[rag.reader]` names
another reader, the arena reads with that model (`kind = "builtin"`); prompt, k (`rag.ask_k`) and
token limit are the ones `pgfresh ask` uses. The answer cache is off in the arena (a repeated
question would otherwise be answered from the cache and inflate accuracy).

- `stale`: the base model, closed-book, never updated: what the snapshot taught it.
- `rag-dense`: `serve.answer(mode="rag")` with dense retrieval only (pgvector HNSW), no rerank.
- `rag-hybrid`: `serve.answer(mode="rag")` with hybrid retrieval and the configured rerank.
- `tuned`: `serve.answer(mode="tuned")`: the tenant's continual slice; the rounds that are due
  (`pgfresh train --once`) run between batches, or in a timed run in the arena's trainer process
  beside the questions (pgfresh.arena.trainer), so its time-to-fresh includes training.
- `tuned-gate-off`: `tuned` with the publish gate off, on the same questions: a lineage of its own
  per tenant (`_gate-off:<slice>`, `train.rounds.lineage_name`; no tenant's `ask` ever reads it)
  that publishes every round whatever its forgetting, at the same times `tuned` trains. Beside
  `tuned` it shows what the gate buys: the answers a rejected round would have changed.
- `hybrid`: `serve.answer(mode="hybrid")`: the product's router (pgfresh.serve.router, configured
  by `[serve.router]`). The route taken is the first entry of each answer's sources
  (`route:slice` / `route:rag`).

They register through `register` like any third-party strategy (pgfresh.arena.strategy).
All of them see the gated data (the quality gate is on); `pgfresh arena --gate off` compares a run
without it.
"""

from __future__ import annotations

import dataclasses
import time

from pgfresh.arena.strategy import Answer, ArenaContext, Question, Strategy, register


def registry(ctx: ArenaContext):
    """The run's registry (one per ArenaContext): every strategy shares its loaded models."""
    from pgfresh.serve import Registry

    if getattr(ctx, "registry", None) is None:
        ctx.registry = Registry()
    return ctx.registry


def arena_config(config):
    """The config the adapters answer with: the user's, with the built-in reader if none is configured."""
    if config.rag.get("reader"):
        return config
    return dataclasses.replace(config, rag={**config.rag, "reader": {"kind": "builtin"}})


def ensure_base_model(ctx: ArenaContext, console=None):
    """Build the built-in model on the current snapshot if needed; return it loaded (shared)."""
    return registry(ctx).base_model(ctx.config, build=True, console=console or ctx.console)


class _Served(Strategy):
    """An adapter: a question goes to `serve.answer` in `mode` with `options`; the answer comes back."""

    mode = "rag"

    def __init__(self, **options):
        self.options = options

    def prepare(self, ctx: ArenaContext) -> None:
        from pgfresh.serve import Options

        self.config, self.registry = arena_config(ctx.config), registry(ctx)
        self.opts = Options(cache=False, **self.options)
        ensure_base_model(ctx)

    def answer(self, question: Question) -> Answer:
        from pgfresh.serve import answer

        t0 = time.perf_counter()
        out = answer(self.config, question.text, question.tenant, self.mode, options=self.opts, registry=self.registry)
        latency = time.perf_counter() - t0
        docs = out.get("sources") or []
        route = out["route"]["taken"]
        sources = ([f"route:{route}"] if self.kind == "hybrid" else [])
        if route == "slice":
            sources.append(f"slice {out['slice']['name']} v{out['slice']['version']}")
        else:
            sources += [f"{s['tbl']}{s['key']}" for s in docs]
        return Answer(out["answer"] or "", latency, sources=sources, retrieved_keys=[(s["tbl"], s["key"]) for s in docs],
                      route=out["route"])

    def close(self) -> None:
        if getattr(self, "registry", None) is not None:
            self.registry.evict("connections")


class Stale(Strategy):
    kind, gate = "stale", None

    def prepare(self, ctx: ArenaContext) -> None:
        self.loaded = ensure_base_model(ctx)
        self.lock = registry(ctx).base_lock(ctx.config)

    def answer(self, question: Question) -> Answer:
        from pgfresh.model import generate, prompt_for
        from pgfresh.serve.answer import TUNED_MAX_NEW_TOKENS

        t0 = time.perf_counter()
        with self.lock:
            text = generate(self.loaded, [prompt_for(self.loaded, question.text)], max_new_tokens=TUNED_MAX_NEW_TOKENS)[0]
        return Answer(text, time.perf_counter() - t0, sources=["base model"])


class Rag(_Served):
    kind, gate, mode = "rag", True, "rag"


class Tuned(_Served):
    kind, gate, publish_gate, mode = "tuned", True, True, "tuned"
    rounds = {"variant": None, "gate": True}

    def prepare(self, ctx: ArenaContext) -> None:
        from pgfresh import train

        super().prepare(ctx)
        train.run(ctx.config, once=True)  # version 1 of every slice: the facts waiting now

    def refresh(self, ctx: ArenaContext) -> None:
        from pgfresh.train import rounds

        if ctx.trainer is None:  # else the arena's trainer process runs them
            # Only the rounds that are due (enough new facts, or waited long; back-off after a rejection).
            rounds.run(ctx.config, once=True, due_only=True, **self.rounds)


class TunedGateOff(Strategy):
    """Closed-book from the tenant's gate-off lineage, loaded through the run's registry as
    `serve.answer(mode="tuned")` loads a slice; rounds run with `gate=False`."""

    kind, gate, publish_gate = "tuned", True, False
    VARIANT = "gate-off"
    rounds = {"variant": VARIANT, "gate": False}

    def prepare(self, ctx: ArenaContext) -> None:
        from pgfresh.train import rounds

        self.config, self.registry = arena_config(ctx.config), registry(ctx)
        ensure_base_model(ctx)
        rounds.run(ctx.config, once=True, **self.rounds)

    def refresh(self, ctx: ArenaContext) -> None:
        from pgfresh.train import rounds

        if ctx.trainer is None:
            rounds.run(ctx.config, once=True, due_only=True, **self.rounds)

    def answer(self, question: Question) -> Answer:
        from pgfresh.model import generate, prompt_for
        from pgfresh.serve.answer import TUNED_MAX_NEW_TOKENS
        from pgfresh.train import rounds, slices

        t0 = time.perf_counter()
        with self.registry.connection(self.config, "arena") as conn:
            name = rounds.lineage_name(question.tenant, self.VARIANT)
            version = slices.current(conn, name)
            if version is None:
                raise slices.SliceError(f"no {name} lineage yet: the strategy's prepare trains it")
            version, loaded, lock, _ = self.registry.slice_model(self.config, conn, version)
        with lock:
            text = generate(loaded, [prompt_for(loaded, question.text)], max_new_tokens=TUNED_MAX_NEW_TOKENS)[0]
        return Answer(text, time.perf_counter() - t0, sources=[f"slice {version.slice} v{version.version}"])

    def close(self) -> None:
        if getattr(self, "registry", None) is not None:
            self.registry.evict("connections")


class Hybrid(_Served):
    kind, gate, mode = "hybrid", True, "hybrid"
    # the tuned strategy (same data directory) trains the slices this one reads


@register("stale")
def stale(ctx: ArenaContext) -> Strategy:
    return Stale()


@register("rag-dense")
def rag_dense(ctx: ArenaContext) -> Strategy:
    return Rag(search_mode="dense", rerank="none")


@register("rag-hybrid")
def rag_hybrid(ctx: ArenaContext) -> Strategy:
    return Rag(search_mode="hybrid")  # the configured rerank (default: embedder re-scoring + overlap)


@register("tuned")
def tuned(ctx: ArenaContext) -> Strategy:
    return Tuned()


@register("tuned-gate-off")
def tuned_gate_off(ctx: ArenaContext) -> Strategy:
    return TunedGateOff()


@register("hybrid")
def hybrid(ctx: ArenaContext) -> Strategy:
    return Hybrid()
