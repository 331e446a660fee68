"""The one interface every arena strategy implements, and the registry strategies join.

A strategy sees only what a user's application would see: the question text and the tenant it is
asked for (`Question`), never the table, the key or the true answer. It returns an `Answer` with
its text, how long it took, and, for retrieval strategies, what it retrieved (so the arena can
measure retrieval hit@k apart from answer accuracy).

    class MyStrategy(Strategy):
        name, kind = "my-rag", "rag"
        def prepare(self, ctx): ...          # build the index / model before the live phase
        def refresh(self, ctx): ...          # between question batches; keep it short
        def answer(self, question): return Answer("12.50", latency_s=0.01)

    register("my-rag", lambda ctx: MyStrategy())

Built-in strategies of later stages register lazily by import path in `BUILTIN` so that importing
the arena does not import torch. `create(name, ctx)` builds one; `available()` lists the names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pgfresh.errors import ConfigError

KINDS = ("stale", "rag", "tuned", "hybrid", "other")  # what the verdict compares


@dataclass(frozen=True)
class Question:
    """What a strategy is asked: text and tenant, nothing that gives the answer away."""

    id: str
    text: str
    tenant: str | None = None


@dataclass
class Answer:
    text: str
    latency_s: float  # wall seconds the strategy spent answering (its own measurement)
    sources: list[str] = field(default_factory=list)  # free-form: document ids, slice names, ...
    # (table, key_text) of the rows retrieved, best first; key_text as pgfresh.capture.change.key_text
    retrieved_keys: list[tuple[str, str]] = field(default_factory=list)
    gpu_s: float | None = None  # GPU seconds spent, where the strategy can tell


@dataclass
class ArenaContext:
    """What prepare / refresh hooks get: the loaded config, the source DSN, the run's seed, and the
    store's DSN (where pgfresh's tables are: read them there, never through `dsn`)."""

    config: Any  # pgfresh.config.Config
    dsn: str
    seed: int
    console: Any = None
    store_dsn: str | None = None  # None: the source database holds the store too


class Strategy:
    """Base class with do-nothing hooks; subclasses set `name`, `kind` and implement `answer`."""

    name: str = "unnamed"
    kind: str = "other"  # one of KINDS
    gate: bool | None = None  # whether the quality gate is on for this strategy (None: not applicable)

    def prepare(self, ctx: ArenaContext) -> None:
        """Build whatever the strategy needs before the live phase (index, model, slices)."""

    def refresh(self, ctx: ArenaContext) -> None:
        """Take in new data between question batches. Long work belongs in a background process."""

    def answer(self, question: Question) -> Answer:
        raise NotImplementedError

    def background_cpu_s(self) -> float:
        """CPU seconds spent outside prepare/refresh/answer (e.g. a training process); 0 if none."""
        return 0.0

    def close(self) -> None:
        """Release models, connections and background processes."""


Factory = Callable[[ArenaContext], Strategy]
_REGISTRY: dict[str, Factory] = {}
# name -> "module:callable"; imported on first use. Filled as the stages land (stale, rag-dense,
# rag-hybrid, tuned, hybrid, each with the gate on and off).
BUILTIN: dict[str, str] = {
    "stale": "pgfresh.arena.strategies:stale",
    "rag-dense": "pgfresh.arena.strategies:rag_dense",
    "rag-hybrid": "pgfresh.arena.strategies:rag_hybrid",
    "tuned": "pgfresh.arena.strategies:tuned",
    "hybrid": "pgfresh.arena.strategies:hybrid",
}


def register(name: str, factory: Factory | None = None):
    """Register a strategy factory under `name`; usable as a decorator."""
    def add(f: Factory) -> Factory:
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def available() -> list[str]:
    return sorted(set(_REGISTRY) | set(BUILTIN))


def create(name: str, ctx: ArenaContext) -> Strategy:
    """A new strategy instance; ConfigError naming the known strategies if `name` is unknown."""
    factory = _REGISTRY.get(name)
    if factory is None and name in BUILTIN:
        module, attr = BUILTIN[name].split(":")
        factory = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = factory
    if factory is None:
        known = ", ".join(available()) or "none registered"
        raise ConfigError([f"arena.strategies: unknown strategy {name!r} (known: {known})"], str(ctx.config.path))
    strategy = factory(ctx)
    if strategy.kind not in KINDS:
        raise ValueError(f"strategy {name}: kind {strategy.kind!r} is not one of {KINDS}")
    strategy.name = name
    return strategy
