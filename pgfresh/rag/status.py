"""What `pgfresh status` shows of the rag stage: documents, backlog, generations, freshness, cache.

Freshness is two figures: `freshness`, the commit -> searchable histogram of every streamed change
since the index began (percentiles of all time: one slow start stays in them), and `latest`, the
newest searchable change now (the active generation's document of the highest LSN: its row, LSN,
commit time, how long after its commit it became searchable, and how long ago), read on each call.
"""

from __future__ import annotations

import math

from psycopg import errors as pgerr


def percentile_ms(buckets: list[tuple[int, int]], q: float) -> float | None:
    """The q-quantile of the freshness histogram, as its bucket's upper bound (within 10%)."""
    total = sum(n for _, n in buckets)
    if not total:
        return None
    need, seen = q * total, 0
    for b, n in sorted(buckets):
        seen += n
        if seen >= need:
            return round(math.pow(1.1, b + 1) - 1, 1)
    return None


def counts(conn) -> dict:
    """One dict of figures; an empty one (with `indexed: false`) before migration 003 ran."""
    try:
        gens = conn.execute(
            "select id, embedder, embedder_version, state, backfill_tbl is not null from pgfresh.rag_indexes"
            " where state in ('active', 'building') order by id").fetchall()
    except pgerr.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        return {"indexed": False}
    active = next((g for g in gens if g[3] == "active"), None)
    building = next((g for g in gens if g[3] == "building"), None)
    docs = conn.execute("select count(*) from pgfresh.documents where index_id = %s",
                        (active[0] if active else -1,)).fetchone()[0]
    rebuilt = conn.execute("select count(*) from pgfresh.documents where index_id = %s",
                           (building[0] if building else -1,)).fetchone()[0]
    queue = conn.execute("select count(*), extract(epoch from now() - min(queued_at)) from pgfresh.index_queue").fetchone()
    behind = conn.execute(
        "select count(*) from pgfresh.changes c where seq > coalesce((select k.seq from pgfresh.consumers k"
        " where k.pipeline = c.pipeline and k.name = 'index'), 0)").fetchone()[0]
    buckets = conn.execute("select bucket, n from pgfresh.rag_freshness").fetchall()
    counters = dict(conn.execute("select name, value from pgfresh.rag_counters").fetchall())
    latest = conn.execute(
        "select tbl, key, lsn::text, commit_time, round(extract(epoch from indexed_at - commit_time) * 1000, 1)::float8,"
        " round(extract(epoch from now() - indexed_at), 3)::float8 from pgfresh.documents"
        " where index_id = %s order by lsn desc limit 1", (active[0] if active else -1,)).fetchone()
    entries = conn.execute("select count(*) from pgfresh.answer_cache").fetchone()[0]
    asks = counters.get("cache_hits", 0) + counters.get("cache_misses", 0)
    return {
        "indexed": active is not None,
        "documents": docs,
        "embedder": f"{active[1]}@{active[2]}" if active else None,
        "reembedding": {"embedder": f"{building[1]}@{building[2]}", "documents": rebuilt} if building else None,
        "changes_behind": behind,
        "queued": queue[0],
        "oldest_queued_seconds": round(float(queue[1]), 3) if queue[1] is not None else None,
        "freshness": {"changes": sum(n for _, n in buckets), "p50_ms": percentile_ms(buckets, 0.5),
                      "p99_ms": percentile_ms(buckets, 0.99)},
        "latest": None if latest is None else {
            "tbl": latest[0], "key": latest[1], "lsn": latest[2],
            "commit_time": latest[3].isoformat() if latest[3] else None,  # null: read by the snapshot
            "searchable_after_ms": latest[4], "indexed_seconds_ago": latest[5]},
        "cache": {"entries": entries, "hits": counters.get("cache_hits", 0), "misses": counters.get("cache_misses", 0),
                  "hit_rate": round(counters.get("cache_hits", 0) / asks, 4) if asks else None,
                  "stores": counters.get("cache_stores", 0), "invalidations": counters.get("cache_invalidations", 0),
                  "refused_stale": counters.get("cache_refused_stale", 0)},
    }
