"""The registry: the one place that owns what serving loads (readers, the base model, slices, embedders,
cross-encoders, connections).

One `Registry` is made at the edge (the CLI command, the HTTP server, an arena run) and passed to
`serve.answer`; nothing in the answer path keeps a module-level cache of its own. Loading is
explicit and visible (`loaded()`), a slice is reloaded when its published version moves (a publish
or a rollback; if the new version cannot be loaded the one in memory keeps serving, with a
warning), and `evict()` drops everything or one kind.

Embedders and cross-encoders are held by `models` (a bounded `pgfresh.rag.models.Models`, with load,
hit and eviction counters), which the registry passes to every search. By default it is the
process's: the index worker running in the same process (the arena) then shares the loaded embedder
instead of holding a second copy.

Generation on one loaded model is serialised by a lock per model: torch's CPU generation is not
made faster by interleaving, and one tokenizer is not safe to share mid-call.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from contextlib import contextmanager

from pgfresh import db
from pgfresh.errors import PgfreshError


class BuiltinReader:
    """The built-in model (or `train.base_model`) as the open-book reader: its own prompt format
    (`pgfresh.model.prompt_for` of its tokenizer)."""

    builtin = True

    def __init__(self, loaded, lock: threading.Lock):
        self.loaded, self.lock = loaded, lock
        self.prompt_tokenizer = loaded.tokenizer
        self.id = f"builtin:{loaded.base_id}"

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        from pgfresh.model import generate

        with self.lock:
            return generate(self.loaded, [prompt], max_new_tokens=max_new_tokens)[0]


class Registry:
    """Loaded readers, base models and slice versions, and pooled store connections (thread-safe)."""

    def __init__(self, pool_size: int = 8, models=None):
        from pgfresh.rag import models as rag_models

        self.models = models if models is not None else rag_models.process()
        self._lock = threading.RLock()
        self._readers: dict[tuple, object] = {}
        self._bases: dict[str, tuple[object, threading.Lock]] = {}
        self._slices: dict[tuple[str, str], tuple[int, object, threading.Lock]] = {}
        self._pools: dict[str, queue.LifoQueue] = {}
        self._migrated: set[str] = set()
        self._building: dict[tuple, threading.Lock] = {}  # one lock per reader or base model being loaded
        self.pool_size = pool_size
        self.events: list[dict] = []  # loads and evictions, newest last (at most 100)
        self.warm_state = "cold"  # cold, loading, warm, or "failed: <one line>" (see warm())

    def _event(self, what: str, name: str) -> None:
        self.events = (self.events + [{"at": time.time(), "event": what, "name": name}])[-100:]

    # --- connections ----------------------------------------------------------------------------
    @contextmanager
    def connection(self, config, role: str = "serve"):
        """An autocommit store connection with pgvector registered and the schema migrated (pooled)."""
        from pgvector.psycopg import register_vector

        dsn = db.store_dsn(config)
        with self._lock:
            pool = self._pools.setdefault(dsn, queue.LifoQueue())
        try:
            conn = pool.get_nowait()
        except queue.Empty:
            conn = db.connect(dsn, role, autocommit=True)
            if dsn not in self._migrated:
                db.migrate(conn)
                self._migrated.add(dsn)
            register_vector(conn)
        broken = False
        try:
            yield conn
        except BaseException:
            broken = conn.closed or conn.info.transaction_status != 0  # not idle: do not reuse
            raise
        finally:
            if broken or conn.closed or pool.qsize() >= self.pool_size:
                conn.close()
            else:
                pool.put(conn)

    # --- readers --------------------------------------------------------------------------------
    def reader(self, config, environ: dict | None = None):
        """The reader `[rag.reader]` configures (None: no reader), loaded once."""
        from pgfresh.rag import reader as readers

        spec = config.rag.get("reader")
        if not spec:
            return None
        environ = os.environ if environ is None else environ
        kind = spec.get("kind", "openai")
        key = (kind, json.dumps(spec, sort_keys=True), str(config.path.parent), str(config.data_dir),
               environ.get(spec.get("api_key_env") or "", ""))

        def build():
            if kind == "builtin":
                loaded, lock = self._base(config)
                built = BuiltinReader(loaded, lock)
            else:
                built = readers.build(spec, base_dir=config.path.parent, environ=environ, data_dir=config.data_dir)
            self._event("load", f"reader {built.id}")
            return built

        return self._once(self._readers, key, build)

    # --- the base model -------------------------------------------------------------------------
    def base_model(self, config, build: bool = False, console=None):
        """The base model (`train.base_model` or the built-in one), loaded once; `build`: build it if missing."""
        from pgfresh import model

        if build:
            with self._lock:
                path = model.base_dir(config)
                if not config.train.get("base_model") and not (path / model.META_FILE).exists():
                    model.build(config, console=console)
        return self._base(config)[0]

    def base_lock(self, config) -> threading.Lock:
        return self._base(config)[1]

    def _base(self, config):
        from pgfresh import model

        path = str(model.base_dir(config))

        def build():
            loaded = model.load(path)
            self._event("load", f"base {path}")
            return loaded, threading.Lock()

        return self._once(self._bases, path, build)

    def _once(self, table: dict, key, build):
        """`table[key]`, built once by `build()` outside the registry's lock (a load takes seconds:
        `loaded()`, status and the other models must not wait for it), under a lock of its own."""
        with self._lock:
            if key in table:
                return table[key]
            building = self._building.setdefault((id(table), key), threading.Lock())
        with building:
            with self._lock:
                if key in table:
                    return table[key]
            value = build()
            with self._lock:
                table[key] = value
                self._building.pop((id(table), key), None)
            return value

    # --- slices ---------------------------------------------------------------------------------
    def slice_model(self, config, conn, version) -> tuple[object, object, threading.Lock, str | None]:
        """The loaded model of the slice's published `version` (a `train.slices.Version`).

        Reloads when the published version moved; if it cannot be loaded, the version already in
        memory keeps serving. Returns (version served, loaded model, its lock, warning or None).
        """
        from pgfresh.train import fit, settings, slices

        key = (str(config.data_dir), version.slice)
        with self._lock:
            held = self._slices.get(key)
            warning = None
            if held is None or held[0] != version.version:
                try:
                    s = settings(config)
                    fit.set_threads(s.threads, s.deterministic)
                    loaded = slices.load_version(config, conn, version, device=fit.pick_device(s.device)[0])
                    self._slices[key] = (version.version, loaded, threading.Lock())
                    self._event("load", f"slice {version.slice} v{version.version}")
                except PgfreshError as exc:
                    if held is None:
                        raise
                    warning = f"version {version.version} cannot be loaded, version {held[0]} keeps serving: {exc}"
            served, loaded, lock = self._slices[key]
        if served != version.version:
            version = slices.get_version(conn, version.slice, served)
        return version, loaded, lock, warning

    # --- warming ----------------------------------------------------------------------------------
    def warm(self, config) -> None:
        """Load what the first request would otherwise wait for: the active index's embedder (with one
        embedding, torch's first pass being slow too) and the configured reader.

        Why: the server loaded the embedder on its first search, which then took 15 s at load 4 and
        27-52 s at load 10-13 (measured, docs/SERVE.md); a dashboard or client retrying meanwhile
        piled requests behind it. `pgfresh serve` warms in the background and `/readyz` says "loading
        models" until it is done. A failure is kept in `warm_state` (status shows it); the requests
        that need the model then fail with the same error, as they would have anyway.
        """
        from pgfresh.rag import retrieval

        self.warm_state = "loading"
        try:
            if "rag" in config.sections:
                with self.connection(config, "serve") as conn:
                    active = retrieval.active_generation(conn, config, self.models)
                if active is not None and active.model is not None:
                    active.model.embed(["warm-up"])
                self.reader(config)
            self.warm_state = "warm"
        except PgfreshError as exc:
            self.warm_state = "failed: " + str(exc).splitlines()[0]
        finally:
            if self.warm_state == "loading":  # a bug, raised on in the warming thread
                self.warm_state = "failed: see the server log"

    # --- visibility and eviction ----------------------------------------------------------------
    def loaded(self) -> dict:
        """What is in memory now (for `status` and the dashboard)."""
        with self._lock:
            return {"readers": sorted(r.id for r in self._readers.values()),
                    "base_models": sorted(self._bases),
                    "slices": sorted(f"{name} v{v}" for (_, name), (v, _, _) in self._slices.items()),
                    "models": self.models.stats(), "warm": self.warm_state,
                    "connections": {dsn.split("@")[-1]: p.qsize() for dsn, p in self._pools.items()}}

    def evict(self, kind: str | None = None) -> None:
        """Drop loaded models of `kind` (readers, base_models, slices, models, connections) or all of them.

        `models` (embedders, cross-encoders) may be the process's, shared with an index worker: it
        reloads what it needs on its next batch."""
        with self._lock:
            if kind in (None, "readers"):
                self._readers.clear()
            if kind in (None, "base_models"):
                self._bases.clear()
                self._readers = {k: r for k, r in self._readers.items() if not getattr(r, "builtin", False)}
            if kind in (None, "slices"):
                self._slices.clear()
            if kind in (None, "models"):
                self.models.evict()
            if kind in (None, "connections"):
                for pool in self._pools.values():
                    while not pool.empty():
                        pool.get_nowait().close()
            self._event("evict", kind or "all")

    def close(self) -> None:
        self.evict()
