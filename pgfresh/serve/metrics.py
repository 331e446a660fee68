"""`GET /metrics`: the pipeline's figures in Prometheus format, read from the store at scrape time.

Store-backed (one short read per scrape): per source, capture lag (bytes, seconds) and the WAL its
slot retains, as `pgfresh sync` measured them on that source and left in its heartbeat
(pgfresh.workers.info, every 2 s while sync runs; `pgfresh_capture_heartbeat_age_seconds` says how
old they are), and change-log positions by stage; the commit->searchable histogram, quarantine
counts by path and reason (check), answer-cache events, training rounds by outcome. The serving side
never connects to a source: its figures come from the process that does. In-process: answer latency
by mode (`pgfresh_answer_seconds`). No metric carries a tenant label: a tenant's key may scrape
`/metrics` without learning anything about another tenant.
"""

from __future__ import annotations

import math
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from psycopg import errors as pgerr

SEARCHABLE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
ANSWER_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One per app: its own CollectorRegistry (several apps in one process do not collide)."""

    def __init__(self, config, reg):
        self.registry = CollectorRegistry()
        self.answer_seconds = Histogram("pgfresh_answer_seconds", "Answer latency by mode (HTTP API)", ["mode"],
                                        buckets=ANSWER_BUCKETS_S, registry=self.registry)
        self.registry.register(_StoreCollector(config, reg))
        self._lock = threading.Lock()

    def observe_answer(self, mode: str, seconds: float) -> None:
        self.answer_seconds.labels(mode).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        with self._lock:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StoreCollector:
    def __init__(self, config, reg):
        self.config, self.reg = config, reg

    def describe(self):
        return []  # collected on scrape only (no describe-time store read)

    def collect(self):
        with self.reg.connection(self.config, "metrics") as conn:
            yield from _capture(conn, self.config)
            yield from _optional(conn, _freshness)
            yield from _optional(conn, _quarantine)
            yield from _optional(conn, _cache)
            yield from _optional(conn, _rounds)


def _optional(conn, fn):
    """A stage's figures, or none before its migration ran."""
    try:
        return list(fn(conn))
    except pgerr.UndefinedTable:
        return []


def _capture(conn, config):
    """Per source: capture lag and slot WAL as sync measured them on the source (serve never connects
    to a source), the heartbeat's age (how old those figures are), and change-log positions by stage."""
    names = {s.slot: s.name for s in config.sources if s.name}
    beats = conn.execute(
        "select pipeline, info, extract(epoch from now() - heartbeat)::float8 from pgfresh.workers"
        " where name = 'capture' or name like 'capture@%%' order by pipeline").fetchall() \
        if _exists(conn, "pgfresh.workers") else []
    families = [
        ("pgfresh_capture_lag_bytes", "WAL bytes between the source's position and what capture stored", "lag_bytes"),
        ("pgfresh_capture_lag_seconds", "Seconds from commit to capture, as capture last measured", "lag_seconds"),
        ("pgfresh_slot_retained_wal_bytes", "WAL the replication slot keeps on the source", "retained_wal_bytes"),
        ("pgfresh_capture_heartbeat_age_seconds", "Seconds since sync last measured the figures above", None),
    ]
    for metric, help_, key in families:
        g = GaugeMetricFamily(metric, help_ + " (by source)", labels=["source"])
        for pipeline, info, age in beats:
            value = age if key is None else (info or {}).get(key)
            g.add_metric([names.get(pipeline, pipeline)], math.nan if value is None else float(value))
        yield g
    if _exists(conn, "pgfresh.consumers"):
        c = CounterMetricFamily("pgfresh_changes", "Changes in the change log (stage=log) and taken by each stage",
                                labels=["source", "stage"])
        for pipeline, seq in conn.execute(  # one index lookup per pipeline (the log can be large)
                "select p.pipeline, (select coalesce(max(seq), 0) from pgfresh.changes c where c.pipeline = p.pipeline)"
                " from (select distinct pipeline from pgfresh.consumers) p order by 1"):
            c.add_metric([names.get(pipeline, pipeline), "log"], float(seq))
        for pipeline, name, seq in conn.execute("select pipeline, name, seq from pgfresh.consumers order by 1, 2"):
            c.add_metric([names.get(pipeline, pipeline), name], float(seq))
        yield c


def _exists(conn, name: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", (name,)).fetchone()[0]


def _freshness(conn):
    rows = conn.execute("select bucket, n from pgfresh.rag_freshness order by bucket").fetchall()
    counts = [0] * (len(SEARCHABLE_BUCKETS_S) + 1)
    total_s = 0.0
    for b, n in rows:
        upper_s = (math.pow(1.1, b + 1) - 1) / 1000  # the bucket's upper bound (rag.status.percentile_ms)
        i = next((i for i, le in enumerate(SEARCHABLE_BUCKETS_S) if upper_s <= le), len(SEARCHABLE_BUCKETS_S))
        counts[i] += n
        total_s += upper_s * n
    cumulative, buckets = 0, []
    for le, n in zip(list(SEARCHABLE_BUCKETS_S) + [math.inf], counts):
        cumulative += n
        buckets.append(("+Inf" if le == math.inf else str(le), float(cumulative)))
    h = HistogramMetricFamily("pgfresh_commit_to_searchable_seconds",
                              "Seconds from a source commit to the document being searchable (sum: bucket upper bounds)")
    h.add_metric([], buckets, total_s)
    yield h


def _quarantine(conn):
    g = GaugeMetricFamily("pgfresh_quarantined", "Changes held in quarantine (not released), by path and check",
                          labels=["path", "check"])
    for path, check, n in conn.execute("select path, check_name, count(*) from pgfresh.quarantine"
                                       " where released_at is null group by 1, 2 order by 1, 2"):
        g.add_metric([path, check], float(n))
    yield g


def _cache(conn):
    c = CounterMetricFamily("pgfresh_answer_cache_events", "Answer cache events (hits, misses, stores, invalidations, "
                            "refused_stale)", labels=["event"])
    for name, value in conn.execute("select name, value from pgfresh.rag_counters where name like 'cache_%%' order by 1"):
        c.add_metric([name.removeprefix("cache_")], float(value))
    yield c


def _rounds(conn):
    c = CounterMetricFamily("pgfresh_training_rounds", "Training rounds by outcome (published = passed the gate)",
                            labels=["status"])
    for status, n in conn.execute("select status, count(*) from pgfresh.train_rounds group by 1 order by 1"):
        c.add_metric([status], float(n))
    yield c
