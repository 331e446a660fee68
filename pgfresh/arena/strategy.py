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

The built-in strategies (pgfresh.arena.strategies, adapters over `pgfresh.serve.answer`) register
the same way when the arena package is imported; their heavy imports stay inside their hooks, so
importing the arena does not import torch. `create(name, ctx)` builds one and refuses, loudly, a
factory that returns no Strategy or a strategy without its own `answer`; `available()` lists the names.
"""

from __future__ import annotations

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
    route: dict | None = None  # serve's `route` (taken, reason, confidence, signals), where serve answered


@dataclass
class ArenaContext:
    """What prepare / refresh hooks get: the loaded config, the source DSN, the run's seed, and the
    store's DSN (where pgfresh's tables are: read them there, never through `dsn`)."""

    config: Any  # pgfresh.config.Config
    dsn: str
    seed: int
    console: Any = None
    store_dsn: str | None = None  # None: the source database holds the store too
    registry: Any = None  # the run's pgfresh.serve.Registry (loaded models), made by the first strategy that needs it
    trainer: Any = None  # a timed run's pgfresh.arena.trainer.Trainer: it runs the `rounds` of tuned strategies


class Strategy:
    """Base class with do-nothing hooks; subclasses set `name`, `kind` and implement `answer`."""

    name: str = "unnamed"
    kind: str = "other"  # one of KINDS
    gate: bool | None = None  # whether the quality gate is on for this strategy (None: not applicable)
    publish_gate: bool | None = None  # tuned kinds: whether a round must pass the publish gate to serve
    # tuned kinds that train pgfresh's rounds: `pgfresh.train.rounds.run` keyword arguments (variant,
    # gate). A timed run trains them in its trainer process (ctx.trainer); refresh skips them then.
    rounds: dict | None = None

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


def register(name: str, factory: Factory | None = None):
    """Register a strategy factory under `name`; usable as a decorator."""
    def add(f: Factory) -> Factory:
        if not callable(f):
            raise TypeError(f"strategy {name}: the factory must be callable (ctx -> Strategy), got {f!r}")
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, ctx: ArenaContext) -> Strategy:
    """A new strategy instance; ConfigError naming the known strategies if `name` is unknown."""
    factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(available()) or "none registered"
        raise ConfigError([f"arena.strategies: unknown strategy {name!r} (known: {known})"], str(ctx.config.path))
    strategy = factory(ctx)
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy {name}: its factory returned {type(strategy).__name__}, not a Strategy")
    if type(strategy).answer is Strategy.answer:
        raise TypeError(f"strategy {name}: {type(strategy).__name__} does not implement answer(question)")
    if strategy.kind not in KINDS:
        raise ValueError(f"strategy {name}: kind {strategy.kind!r} is not one of {KINDS}")
    strategy.name = name
    return strategy
