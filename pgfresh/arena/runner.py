"""The arena run: `run_arena(config, ...)` drives one run from seeding to the report.

Phases, in order (each timed, wall and CPU):
    seed            the workload creates and seeds its tables, and the change recorder
    initial sync    the pipeline (capture + downstream workers: `pgfresh sync --once`) catches up
    build           every strategy's `prepare` (index, model, slices)
    oltp baseline   the workload runs; pgbench measures OLTP throughput while pgfresh is idle
    live            the workload runs at its rate; every `batch_interval_s` strategies `refresh`,
                    the pipeline catches up, a batch of questions is drawn and its truth read by SQL,
                    and every strategy answers every question; pgbench measures again meanwhile
    export          the long-transaction comparison on the busiest table, the workload still running
    report          metrics, verdict, JSON and HTML

The workload runs in its own process; CPU per strategy is the process CPU time (all threads) spent
inside its calls, taken one call at a time in the main thread. Strategies come from the registry
(`pgfresh.arena.strategy`) by name, or are passed in as objects.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import re
import threading
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pgfresh import db
from pgfresh.arena import dbimpact, metrics
from pgfresh.arena.progress import Progress
from pgfresh.arena.questions import Probe, QuestionGenerator
from pgfresh.arena.settings import ArenaSettings, settings as arena_settings
from pgfresh.arena.strategy import ArenaContext, Strategy, available, create
from pgfresh.arena.trainer import Trainer
from pgfresh.arena.workload import drive, load_workload
from pgfresh.capture.change import key_text
from pgfresh.errors import ConfigError, PgfreshError
from pgfresh.train import slices

MAX_ASKS_PER_CHANGE = 50  # a change still wrong after this many batches stops being re-asked
MAX_EXTRA_BATCHES = 10  # past the deadline, batches to reach min_questions (a batch asks what it can)


class CapturePipeline:
    """pgfresh itself between batches: capture and the downstream workers catch up (sync --once).

    The workers (facts, RAG index) live as long as the pipeline, so the embedder loads once.
    """

    def __init__(self, config):
        from pgfresh import stages

        self.config = config
        self.workers = stages.workers(config)

    def step(self) -> int:
        from pgfresh.capture import sync

        return int(sync.run(self.config, once=True, workers=self.workers).get("changes", 0))

    def close(self) -> None:
        for w in self.workers:
            w.close()


class _Clock:
    """Process CPU and wall seconds of a block."""

    def __enter__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu_s = time.process_time() - self.cpu0
        self.wall_s = time.perf_counter() - self.wall0
        return False


def machine_info(conn) -> dict:
    """The machine's size and the versions a run depends on, for the report."""
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    versions = {}
    for pkg in ("pgfresh", "psycopg", "plotly", "torch", "transformers", "sentence-transformers", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = None
    if "torch" in __import__("sys").modules:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "postgres": conn.execute("show server_version").fetchone()[0],
            "gpu": gpu, "versions": versions}


class ArenaRun:
    """One run's state; `run_arena` calls the phases in order."""

    def __init__(self, config, s: ArenaSettings, dsn: str, strategies: list, pipeline, progress):
        self.config, self.s, self.dsn = config, s, dsn
        self.strategy_specs = strategies
        self.pipeline = pipeline
        self.progress = progress
        self.phases: list[dict] = []
        self.records: list[dict] = []
        self.errors: list[str] = []
        self.cost: dict[str, dict] = {}
        self.strategies: list[Strategy] = []
        self.ingest = {"cpu_s": 0.0, "wall_s": 0.0, "changes": 0}
        self.impact: dict = {}
        self.workload = load_workload(config, s)
        self.conn = db.connect(dsn, "arena", autocommit=True)
        self.proc = None
        self.ctx: ArenaContext | None = None
        self.trainer: Trainer | None = None  # a timed run's, kept after it stops for its CPU figures

    def phase(self, name: str):
        self.progress.phase(name)
        clock = _Clock()
        self.phases.append({"name": name, "clock": clock})
        return clock

    # -- phases ----------------------------------------------------------------------------------
    def seed(self) -> None:
        with self.phase("seed"):
            self.workload.setup(self.conn)
            (self.seeded_at,) = self.conn.execute("select clock_timestamp()").fetchone()
            self.exact = dbimpact.ensure_pgstattuple(self.conn)
            self.counts_start = dbimpact.write_counts(self.conn)
            self.impact["tables_start"] = {t.name: dbimpact.table_stats(self.conn, t.name, self.exact)
                                           for t in self.config.tables}

    def initial_sync(self) -> None:
        with self.phase("initial sync") as clock:
            self.ingest["initial_changes"] = self.pipeline.step() if self.pipeline else 0
        self.ingest["initial_cpu_s"], self.ingest["initial_wall_s"] = clock.cpu_s, clock.wall_s

    def build(self) -> None:
        ctx = ArenaContext(self.config, self.dsn, self.s.seed, self.progress.console, store_dsn=db.store_dsn(self.config))
        self.ctx = ctx
        with self.phase("build"):
            for spec in self.strategy_specs:
                strategy = spec if isinstance(spec, Strategy) else create(spec, ctx)
                if strategy.name in self.cost:
                    raise ConfigError([f"arena.strategies: {strategy.name} is listed twice"], str(self.config.path))
                with _Clock() as c:
                    strategy.prepare(ctx)
                self.strategies.append(strategy)
                self.cost[strategy.name] = {"prepare_cpu_s": c.cpu_s, "prepare_wall_s": c.wall_s,
                                            "refresh_cpu_s": 0.0, "refresh_wall_s": 0.0}

    def start_workload(self) -> None:
        spawn = mp.get_context("spawn")
        self.stop_workload_event, self.counter, self.workload_errors = spawn.Event(), spawn.Value("q", 0), spawn.Queue()
        self.proc = spawn.Process(target=drive, name="arena-workload", daemon=True,
                                  args=(self.config, self.s, self.dsn, self.stop_workload_event, self.counter,
                                        self.workload_errors))
        self.proc.start()
        self.sampler = dbimpact.XminSampler(self.dsn)
        self.sampler.start()

    def wal_windows(self) -> None:
        """WAL the source writes per workload change: a window of the workload alone, then one with pgfresh
        catching up all the time (its steps back to back). Before the pgbench windows, which write WAL too."""
        if not self.s.wal_seconds or self.pipeline is None:
            self.impact["wal"] = None
            return
        if dbimpact.same_server(self.dsn, db.store_dsn(self.config)):
            self.impact["wal"] = {"not_measured": "the store is on the source's server: its WAL would count as the source's"}
            return

        def workload() -> int:
            start = self.counter.value
            time.sleep(self.s.wal_seconds)
            return self.counter.value - start

        with self.phase("wal"):
            without = dbimpact.wal_window(self.dsn, workload)
            stop = threading.Event()

            def capture() -> None:
                while not stop.is_set():
                    self.pipeline.step()

            thread = threading.Thread(target=capture, name="arena-wal-capture", daemon=True)
            thread.start()
            try:
                with_ = dbimpact.wal_window(self.dsn, workload)
            finally:
                stop.set()
                thread.join()
        self.impact["wal"] = {"without_pgfresh": without, "with_pgfresh": with_, "seconds": self.s.wal_seconds,
                              "added_share": dbimpact.wal_share(without, with_),
                              "goal_share": dbimpact.WAL_GOAL_SHARE}

    def oltp_baseline(self) -> None:
        if not self.s.oltp_seconds:
            self.impact["oltp"] = {"without_pgfresh": None, "with_pgfresh": None}
            return
        with self.phase("oltp baseline"):
            self.impact["oltp"] = {"without_pgfresh": dbimpact.oltp_throughput(
                self.dsn, self.s.oltp_seconds, self.s.oltp_clients, db.store_dsn(self.config))}

    def live(self) -> None:
        with self.phase("live"):
            (self.live_start,) = self.conn.execute("select clock_timestamp()").fetchone()
            self.generator = QuestionGenerator(self.config, self.s, self.workload, self.seeded_at)
            self.generator.live_since = self.live_start
            self.watch: dict[tuple, int] = {}
            self.resolved: dict[int, set[str]] = {}
            self.asks: dict[int, int] = {}
            self.batches, self.asked, self.last_asked, self.durations, extra = 0, 0, 1, [], 0
            # With `batches` set, the run is that many batches (tests, comparable runs); else `minutes`.
            count = self.s.batches or None
            begin = time.monotonic()
            deadline = begin + self.s.minutes * 60
            oltp = threading.Thread(target=self._oltp_with, name="arena-oltp", daemon=True)
            jobs = {st.name: st.rounds for st in self.strategies if st.rounds is not None}
            if jobs and not count:  # timed: rounds train beside the questions (pgfresh.arena.trainer)
                self.trainer = self.ctx.trainer = Trainer(self.config, jobs)
                self.trainer.start()
            while (self.batches < count) if count else (time.monotonic() < deadline or self._short(extra)):
                started = time.monotonic()
                extra += started >= deadline and not count
                third = self.batches >= count // 3 if count else started - begin >= self.s.minutes * 60 / 3
                if self.s.oltp_seconds and not oltp.ident and third:
                    oltp.start()  # a third of the way in, with pgfresh working
                self._batch(self._batch_size(count, deadline))
                self.durations.append(time.monotonic() - started)
                self._check_workload()
                wait = started + self.s.batch_interval_s - time.monotonic()
                if not count:
                    wait = min(wait, deadline - time.monotonic())
                if wait > 0 and (not count or self.batches < count):
                    time.sleep(wait)
            if oltp.ident:
                oltp.join()
            (self.live_end,) = self.conn.execute("select clock_timestamp()").fetchone()
            self._stop_trainer()

    def _stop_trainer(self) -> None:
        if self.ctx is not None and self.ctx.trainer is not None:
            self.ctx.trainer.stop()
            self.ctx.trainer = None  # the strategies' refresh trains again (none is called after this)

    def _short(self, extra: int) -> bool:
        """Past the deadline: whether another batch is due to reach min_questions."""
        return self.asked < self.s.min_questions and extra < MAX_EXTRA_BATCHES and self.last_asked > 0

    def _batch_size(self, count: int | None, deadline: float) -> int:
        """questions_per_batch, or more where min_questions needs it: what is still missing spread
        over the batches left (counted, or estimated from the time left and the batches so far)."""
        n = self.s.questions_per_batch
        missing = self.s.min_questions - self.asked
        if missing <= 0:
            return n
        if count:
            left = count - self.batches
        else:
            period = max([self.s.batch_interval_s] + self.durations[-3:])
            left = math.ceil(max(0.0, deadline - time.monotonic()) / period)
        return max(n, math.ceil(missing / max(1, left)))

    def _oltp_with(self) -> None:
        self.impact["oltp"]["with_pgfresh"] = dbimpact.oltp_throughput(self.dsn, self.s.oltp_seconds,
                                                                      self.s.oltp_clients, db.store_dsn(self.config))

    def _check_workload(self) -> None:
        if self.proc is not None and not self.proc.is_alive():
            message = self.workload_errors.get(timeout=1) if not self.workload_errors.empty() else "exited"
            raise PgfreshError(f"the arena workload stopped: {message}")
        if self.trainer is not None and not self.trainer.alive() and not self.trainer.stop_event.is_set():
            raise PgfreshError(f"the arena's trainer stopped: {self.trainer.error() or 'exited'}")

    def _batch(self, n: int) -> None:
        for strategy in self.strategies:
            with _Clock() as c:
                strategy.refresh(self.ctx)
            self.cost[strategy.name]["refresh_cpu_s"] += c.cpu_s
            self.cost[strategy.name]["refresh_wall_s"] += c.wall_s
        # The pipeline catches up last, just before the questions: in production `pgfresh sync`
        # runs all the time, beside the trainer. Caught up before a refresh that trains for
        # seconds, the index would miss every change committed meanwhile, and those are the
        # newest changes, the ones the questions ask about first.
        if self.pipeline:
            with _Clock() as c:
                self.ingest["changes"] += self.pipeline.step()
            self.ingest["cpu_s"] += c.cpu_s
            self.ingest["wall_s"] += c.wall_s
        probes = self.generator.batch(self.conn, n, list(self.watch))
        self.asked += len(probes)
        self.last_asked = len(probes)
        m0 = time.monotonic()
        for probe in probes:
            for strategy in self.strategies:
                self.records.append(self._ask(strategy, probe, m0))
        self._update_watch(probes)
        self.batches += 1
        self.progress.update(self)

    def _ask(self, strategy: Strategy, probe: Probe, m0: float) -> dict:
        cpu0 = time.process_time()
        try:
            answer = strategy.answer(probe.question)
            text, latency, gpu, error = answer.text, answer.latency_s, answer.gpu_s, None
            retrieved, sources, route = answer.retrieved_keys, answer.sources, answer.route
        except Exception as exc:  # recorded as an 'error' outcome and listed in the report
            text, latency, gpu, error = "", 0.0, None, f"{type(exc).__name__}: {exc}"
            retrieved, sources, route = [], [], None
            if len(self.errors) < 20:
                self.errors.append(f"{strategy.name}: {error}")
        cpu = time.process_time() - cpu0
        asked_t = (probe.asked_at - self.live_start).total_seconds()
        return {
            "batch": self.batches, "strategy": strategy.name, "qid": probe.question.id, "question": probe.question.text,
            "tenant": probe.question.tenant, "cls": probe.cls, "change_kind": probe.change_kind,
            "template": probe.template, "table": probe.table, "key": probe.key, "phrasing": probe.phrasing,
            "truth_kind": probe.truth_kind, "truth": probe.truth, "answer": text,
            "outcome": "error" if error else metrics.outcome(probe, text),
            "has_prior": bool(probe.old_values), "noisy_values": bool(probe.noisy_values),
            "event_id": probe.event_id,
            "event_t": None if probe.event_time is None else (probe.event_time - self.live_start).total_seconds(),
            "asked_t": asked_t, "answered_t": asked_t + (time.monotonic() - m0),
            "fact_age_s": None if probe.fact_time is None else (probe.asked_at - probe.fact_time).total_seconds(),
            "latency_s": float(latency), "cpu_s": cpu, "gpu_s": gpu, "sources": [str(x) for x in sources[:5]],
            "hits": metrics.hits(probe, retrieved) if strategy.kind in ("rag", "hybrid") else None,
            "route": None if route is None else {k: route.get(k) for k in ("taken", "confidence")},
        }

    def _update_watch(self, probes: list[Probe]) -> None:
        names = {s.name for s in self.strategies}
        right = {(r["qid"], r["strategy"]) for r in self.records[-len(probes) * len(self.strategies):]
                 if r["outcome"] == "correct"} if probes and self.strategies else set()
        for p in probes:
            if p.cls != "changed" or p.event_id is None:
                continue
            done = self.resolved.setdefault(p.event_id, set())
            done |= {n for n in names if (p.question.id, n) in right}
            self.asks[p.event_id] = self.asks.get(p.event_id, 0) + 1
            if done >= names or self.asks[p.event_id] >= MAX_ASKS_PER_CHANGE:
                self.watch.pop(p.fact, None)
            else:
                self.watch[p.fact] = p.event_id  # a newer change of the same fact replaces the older

    def export(self) -> None:
        table = dbimpact.busiest(self.counts_start, dbimpact.write_counts(self.conn))
        self.impact["busiest_table"] = table
        if not self.s.export_seconds or table is None:
            self.impact["export"] = None
            return
        with self.phase("export comparison"):
            chunks = 10
            self.impact["export"] = dbimpact.export_comparison(
                self.dsn, table, lambda: time.sleep(self.s.export_seconds / chunks), chunks=chunks)

    def stop(self) -> None:
        if self.proc is not None:
            self.stop_workload_event.set()
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.terminate()
            self.proc = None
        if getattr(self, "sampler", None) is not None:
            self.impact["sampler"] = self.sampler.stop()
            self.sampler = None

    def close(self) -> None:
        self._stop_trainer()
        self.stop()
        for strategy in self.strategies:
            strategy.close()
        if self.pipeline:
            self.pipeline.close()
        self.conn.close()


def _workload_stats(run: ArenaRun) -> dict:
    rows = run.conn.execute(
        "select kind, noise, count(*) from arena.events where commit_time between %s and %s group by 1, 2 order by 1",
        (run.live_start, run.live_end)).fetchall()
    total = sum(r[2] for r in rows)
    live_s = (run.live_end - run.live_start).total_seconds()
    facts = {}
    for table, counts in run.generator.change_counts(run.live_start).items():
        n_rows = run.generator.fact_rows(run.conn, table)
        facts[table] = {"rows": n_rows, "changes": counts,
                        "changes_per_fact_per_hour": {t: (n / n_rows / (live_s / 3600) if n_rows and live_s else None)
                                                      for t, n in counts.items()}}
    return {"changes": total, "noise_changes": sum(r[2] for r in rows if r[1]),
            "by_kind": {r[0]: r[2] for r in rows}, "live_seconds": live_s,
            "rate_per_s": total / live_s if live_s else None, "facts": facts}


def assemble(run: ArenaRun, started_at: datetime, machine: dict) -> dict:
    """The results document: everything the report shows, as JSON-ready data."""
    from pgfresh.arena import verdict

    workload = _workload_stats(run)
    _mark_learnt(run)
    strategies = {}
    for s in run.strategies:
        rs = [r for r in run.records if r["strategy"] == s.name]
        background = s.background_cpu_s() + (run.trainer.cpu_s(s.name) if run.trainer is not None else 0.0)
        cost = {**run.cost[s.name], "background_cpu_s": background}
        strategies[s.name] = {"kind": s.kind, "gate": s.gate, "publish_gate": s.publish_gate,
                              **metrics.summarise_strategy(rs, run.batches, cost, workload["changes"])}
    ingest = {**run.ingest, "cpu_s_per_1k_changes": (run.ingest["cpu_s"] / workload["changes"] * 1000
                                                     if workload["changes"] and run.pipeline else None)}
    settings = asdict(run.s)
    results = {
        "format": "pgfresh-arena/1",
        "run": {"workload": run.s.workload, "seed": run.s.seed, "minutes": run.s.minutes, "noise": run.s.noise,
                "rate_per_s": run.s.rate_per_s, "started_at": started_at.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat(), "settings": settings,
                "config": str(run.config.path), "tables": [t.name for t in run.config.tables],
                "strategies": [s.name for s in run.strategies], "pipeline": type(run.pipeline).__name__
                if run.pipeline else None, "machine": machine},
        "phases": [{"name": p["name"], "wall_s": round(p["clock"].wall_s, 3), "cpu_s": round(p["clock"].cpu_s, 3)}
                   for p in run.phases],
        "workload": workload,
        "questions": {"batches": run.batches, "asked": len({r["qid"] for r in run.records}),
                      "by_class": _count_by(run.records, "cls"),
                      "per_strategy": {s.name: sum(r["strategy"] == s.name for r in run.records)
                                       for s in run.strategies}},
        "ingest": ingest,
        "strategies": strategies,
        "dbimpact": {**run.impact, "tables_end": {t.name: dbimpact.table_stats(run.conn, t.name, run.exact)
                                                  for t in run.config.tables}},
        "errors": run.errors,
        "records": run.records,
    }
    results["training"] = _training(run, {s.name: s for s in run.strategies})
    results["verdict"] = verdict.verdict(results)
    results["router"] = verdict.router_table(results)  # the router per class against its parts ([] without them)
    return results


SLICE_SOURCE = re.compile(r"slice (.+) v(\d+)")


def _mark_learnt(run: ArenaRun) -> None:
    """Whether each answer from a slice came from a version that had trained on the asked value.

    Sets `learnt` on every record answered from a slice (None elsewhere): true when the serving
    version's lineage trained a fact of that row and template whose answer is the truth at asking
    time (fact_training roles base, learn, update). This separates "training did not reach the
    fact in time" from "the slice trained it and still answers wrong"."""
    served: dict[tuple[str, int], list[dict]] = {}
    for r in run.records:
        m = SLICE_SOURCE.fullmatch(next((x for x in r["sources"] or [] if x.startswith("slice ")), ""))
        r["learnt"] = None
        if m and r["truth_kind"] == "value" and r["truth"] is not None:
            served.setdefault((m.group(1), int(m.group(2))), []).append(r)
    if not served:
        return
    with db.connect_store(run.config, "arena") as store:
        for (name, version), records in served.items():
            chain = [v.version for v in slices.lineage(store, slices.get_version(store, name, version))]
            trained = set(store.execute(
                "select f.tbl, f.key, f.template, f.answer from pgfresh.fact_training t join pgfresh.facts f using (fact_id)"
                " where t.slice = %s and t.version = any(%s) and t.role in ('base', 'learn', 'update')",
                (name, chain)).fetchall())
            for r in records:
                r["learnt"] = (r["table"], key_text(r["key"]), r["template"], r["truth"]) in trained


def _training(run: ArenaRun, strategies: dict) -> dict:
    """Per tuned strategy, the training rounds of its slices during the live phase: counts by
    status, and each round's size, gate metrics (with intervals) and reasons ({} without training)."""
    tuned = {n: s for n, s in strategies.items() if s.kind == "tuned" and s.publish_gate is not None}
    if not tuned:
        return {}
    out = {}
    with db.connect_store(run.config, "arena") as store:
        if store.execute("select to_regclass('pgfresh.train_rounds')").fetchone()[0] is None:
            return {}
        rows = store.execute(
            "select slice, status, learn, updates, metrics, reason, extract(epoch from started_at - %s),"
            " extract(epoch from finished_at - %s) from pgfresh.train_rounds where started_at >= %s order by id",
            (run.live_start, run.live_start, run.live_start)).fetchall()
    for name, s in tuned.items():
        variant = getattr(s, "VARIANT", None) if s.publish_gate is False else None
        mine = [r for r in rows if _variant_of(r[0]) == variant]
        out[name] = {"published": sum(r[1] == "published" for r in mine), "rejected": sum(r[1] == "rejected" for r in mine),
                     "slices_published": sorted({r[0] for r in mine if r[1] == "published"}),
                     "slices": sorted({r[0] for r in mine}),
                     "rounds": [{"slice": r[0], "status": r[1], "learn": r[2], "updates": r[3], "reason": r[5],
                                 "started_s": float(r[6]), "finished_s": None if r[7] is None else float(r[7]),
                                 **{k: (r[4] or {}).get(k) for k in ("new_accuracy", "new_accuracy_ci", "forgetting",
                                                                     "forgetting_ci", "kept_before", "replay", "probe",
                                                                     "steps", "seconds")}} for r in mine]}
    return out


def _variant_of(slice_name: str) -> str | None:
    """The variant of a lineage named by `train.rounds.lineage_name` (`_<variant>:<slice>`), else None."""
    m = re.match(r"_([^_:][^:]*):", slice_name)
    return m.group(1) if m else None


def _count_by(records: list[dict], field: str) -> dict:
    seen, out = set(), {}
    for r in records:
        if r["qid"] not in seen:
            seen.add(r["qid"])
            out[r[field]] = out.get(r[field], 0) + 1
    return out


def reset_pgfresh(conn, config) -> None:
    """Remove pgfresh's state before a run: slot and publication from the source, schema pgfresh
    from the store (and from the source, where an older layout left it).

    The arena measures a run from scratch; it writes to the workload's tables anyway, so it only
    ever runs on a database of its own (docs/ARENA.md).
    """
    slot, pub = config.source.slot, config.source.publication
    conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                 " where slot_name = %s and database = current_database() and not active", (slot,))
    from psycopg import sql

    conn.execute(sql.SQL("drop publication if exists {}").format(sql.Identifier(pub)))
    conn.execute("drop schema if exists pgfresh cascade")
    with db.connect_store(config, "arena", autocommit=True) as store:
        store.execute("drop schema if exists pgfresh cascade")


def run_arena(config, workload: str | None = None, minutes: float | None = None, noise: float | None = None,
              seed: int | None = None, report: str | Path | None = None, json_path: str | Path | None = None,
              strategies: list | None = None, pipeline="capture", console=None, overrides: dict | None = None) -> dict:
    """Run the arena on `config`'s source and return the results (also written to report / json_path).

    `strategies`: names from the registry or Strategy objects (default: [arena] strategies, else
    every registered one). `pipeline`: "capture" (pgfresh sync --once between batches), an object
    with step() -> changes and close(), or None. `overrides`: further [arena] settings.
    """
    from pgfresh.capture.setup import resolve_dsn

    s = arena_settings(config)
    given = {"workload": workload, "minutes": minutes, "noise": noise, "seed": seed, **(overrides or {})}
    s = replace(s, **{k: v for k, v in given.items() if v is not None})
    if not 0 <= s.noise <= 0.5:
        raise PgfreshError(f"--noise: expected a share between 0 and 0.5, got {s.noise}")
    if s.minutes <= 0:
        raise PgfreshError(f"--minutes: expected a number > 0, got {s.minutes}")
    if s.workload in ("shop", "shop-zh") and "shop.products" not in {t.name for t in config.tables}:
        raise ConfigError(["tables: the shop workload needs its tables (shop.shops, shop.products, ...);"
                           " run `pgfresh arena --config arena.toml` to have a config of its own written"],
                          str(config.path))
    if not s.questions:
        raise ConfigError(["arena.questions: no [[arena.questions]] entry: the arena has nothing to ask about"],
                          str(config.path))
    names = strategies if strategies is not None else (s.strategies or available())
    dsn = resolve_dsn(config)
    pipe = CapturePipeline(config) if pipeline == "capture" else pipeline
    started_at = datetime.now(timezone.utc)
    progress = Progress(console, s.minutes)
    if not names:
        progress.console.print("arena: no strategy registered or named: measuring the workload and the database only")
    run = ArenaRun(config, s, dsn, names, pipe, progress)
    try:
        machine = machine_info(run.conn)
        if pipe is not None:
            reset_pgfresh(run.conn, config)
        run.seed()
        run.initial_sync()
        run.build()
        run.start_workload()
        run.wal_windows()
        run.oltp_baseline()
        run.live()
        run.export()
        run.stop()
        progress.phase("report")
        results = assemble(run, started_at, machine)
    finally:
        run.close()
        progress.close()
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1, default=str))
    if report:
        from pgfresh.arena.report import write_report

        write_report(results, Path(report))
    return results


def arena_command(config_path: Path, workload: str | None = None, minutes: float | None = None,
                  noise: float | None = None, seed: int | None = None, report: Path | None = None,
                  json_path: Path | None = None, strategies: list[str] | None = None, console=None) -> dict:
    """`pgfresh arena`: load (for the shop workload, first write) the config, run, return results."""
    from pgfresh import config as cfg
    from pgfresh.arena.workload import shop_config_text
    config_path = Path(config_path)
    if not config_path.exists() and workload in (None, "shop", "shop-zh"):
        config_path.write_text(shop_config_text({"data_dir": ".pgfresh"}, workload or "shop"), encoding="utf-8")
        if console is not None:
            console.print(f"wrote {config_path} for the {workload or 'shop'} workload (embedded PostgreSQL in .pgfresh)")
    config = cfg.load(config_path)
    return run_arena(config, workload=workload, minutes=minutes, noise=noise, seed=seed, report=report,
                     json_path=json_path, strategies=strategies, console=console)


def print_verdict(results: dict, console) -> None:
    """The verdict and the per-strategy summary, as terminal tables."""
    from rich.table import Table

    from pgfresh.arena.report import STRATEGY_HEAD, strategy_rows

    table = Table(title="verdict", show_lines=True)
    for col in ("claim", "measured evidence", "what it means for this workload"):
        table.add_column(col, overflow="fold")
    for v in results["verdict"]:
        table.add_row(v["claim"], v["evidence"], v["meaning"])
    console.print(table)
    summary = Table(title="strategies")
    for col in STRATEGY_HEAD[:12]:
        summary.add_column(col)
    for row in strategy_rows(results):
        summary.add_row(*row[:12])
    console.print(summary)


# `make demo` must finish in minutes on 2 cores, model build included: a small shop. Its live phase
# (run_demo: 2 minutes) lets the trainer publish a round of every tenant's slice beside the questions
# (at 1.5 minutes slice 1's only round was a rejected 3-fact one).
# At least 300 questions per strategy (questions cost tens of ms each with the built-in reader), so
# that every rate's 95% interval is narrow enough (at most +-6 points at 300) for the verdict.
DEMO_SIZE = {"scale": {"shops": 3, "products_per_shop": 10, "notes_per_shop": 4}, "questions_per_batch": 8,
             "min_questions": 300, "oltp_seconds": 4.0, "export_seconds": 4.0}


def demo_database(workdir: Path) -> Path:
    """A fresh database `pgfresh_arena` on the embedded server in `workdir` (a run starts from its
    seed) and the shop's config for it, workdir/pgfresh.toml; returns the config's path."""
    import psycopg

    from pgfresh.arena.workload import shop_config_text
    from pgfresh.embedded import EmbeddedServer

    workdir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(workdir / "pg")
    with psycopg.connect(server.start(), autocommit=True) as c:
        c.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                  " where database = 'pgfresh_arena' and not active")
        c.execute("drop database if exists pgfresh_arena with (force)")
        c.execute("create database pgfresh_arena")
    path = workdir / "pgfresh.toml"
    path.write_text(shop_config_text({"dsn": server.dsn("pgfresh_arena")}))
    return path


def run_demo(workdir: Path, minutes: float = 2.0, noise: float = 0.1, seed: int = 7, strategies: list | None = None,
             console=None) -> dict:
    """The shop arena on the embedded server in `workdir`, in a fresh database `pgfresh_arena`.

    Writes workdir/pgfresh.toml, workdir/report.html and workdir/results.json; prints the verdict.
    """
    from pgfresh import config as cfg

    workdir = Path(workdir).resolve()
    path = demo_database(workdir)
    results = run_arena(cfg.load(path), minutes=minutes, noise=noise, seed=seed, report=workdir / "report.html",
                        json_path=workdir / "results.json", strategies=strategies, console=console,
                        overrides=DEMO_SIZE)
    if console is not None:
        print_verdict(results, console)
        console.print(f"report: {workdir / 'report.html'}; data: {workdir / 'results.json'}")
    return results
