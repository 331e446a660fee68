"""Loaded embedders and cross-encoders: one bounded cache, with counters, passed to whoever loads.

A model takes seconds to load and hundreds of MB to hold, so it is loaded once per process and
shared; but who holds it, how many, and what was evicted must be visible (DESIGN: one place owns
loaded models). `Models` is that place: a thread-safe LRU of at most `max_loaded` models, keyed by
(kind, key), counting loads, hits and evictions.

The serve `Registry` holds one and passes it to search and answer (`Registry.models`, shown with its
counters in `/v1/status` and on the dashboard, dropped by `Registry.evict("models")`). Callers that
run without a registry (the index worker inside `pgfresh sync`, bench scripts) get `process()`, the
same instance a process's registries hold by default, so a process that indexes and answers (the
arena) holds each model once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

MAX_LOADED = 4  # embedders and cross-encoders; MiniLM is ~90 MB, so 4 fit any machine pgfresh runs on


class Models:
    """At most `max_loaded` loaded models, least recently used evicted first (thread-safe)."""

    def __init__(self, max_loaded: int = MAX_LOADED):
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        self.max_loaded = max_loaded
        self._lock = threading.Lock()  # the table and the counters; never held while a model loads
        self._held: OrderedDict[tuple[str, object], object] = OrderedDict()
        self._building: dict[tuple[str, object], threading.Lock] = {}  # one lock per model being loaded
        self.counters = {"loads": 0, "hits": 0, "evictions": 0}

    def get(self, kind: str, key, build: Callable[[], object]):
        """The model `(kind, key)`, built by `build()` on first use (or after its eviction)."""
        k = (kind, key)
        with self._lock:
            if k in self._held:
                return self._hit(k)
            building = self._building.setdefault(k, threading.Lock())
        # Built outside the cache's lock (a load takes seconds: `stats()` and other models must not
        # wait for it), under the model's own: two threads never load the same model twice.
        with building:
            with self._lock:
                if k in self._held:
                    return self._hit(k)
            model = build()
            with self._lock:
                self._held[k] = model
                self._building.pop(k, None)
                self.counters["loads"] += 1
                while len(self._held) > self.max_loaded:
                    self._held.popitem(last=False)
                    self.counters["evictions"] += 1
            return model

    def _hit(self, k):
        self._held.move_to_end(k)
        self.counters["hits"] += 1
        return self._held[k]

    def evict(self, kind: str | None = None) -> int:
        """Drop the loaded models of `kind` (embedder, cross-encoder) or all; returns how many."""
        with self._lock:
            gone = [k for k in self._held if kind is None or k[0] == kind]
            for k in gone:
                del self._held[k]
            self.counters["evictions"] += len(gone)
            return len(gone)

    def stats(self) -> dict:
        """What is loaded (oldest use first) and the counters, for status and the dashboard."""
        with self._lock:
            return {"loaded": [f"{kind} {_name(m, key)}" for (kind, key), m in self._held.items()],
                    "max_loaded": self.max_loaded, **self.counters}


def _name(model, key) -> str:
    name, version = getattr(model, "name", None), getattr(model, "version", None)
    return f"{name}@{version}" if name and version else str(key[0] if isinstance(key, tuple) else key)


_PROCESS: Models | None = None
_PROCESS_LOCK = threading.Lock()


def process() -> Models:
    """The process's models: what a registry holds unless given others, and what callers without one use."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None:
            _PROCESS = Models()
        return _PROCESS
