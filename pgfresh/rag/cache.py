"""The answer cache: by tenant and question (exactly, or by embedding similarity), invalidated by lineage.

Each entry names the source rows (table, key, LSN) its answer was built from. Invalidation happens
in capture's own transaction: a trigger on `pgfresh.changes` (migration 003) deletes every entry
whose lineage names a row that the change touches, so once a change commits in pgfresh no cache
entry built from the old row exists. Storing an entry re-checks, under a per-table advisory lock
the trigger also takes, that every source row is still at the LSN the answer saw; an answer built
from a row that changed while it was being generated is returned but never cached.

Similarity hits are guarded: the two questions must have the same salient tokens (numbers and
capitalised names), so "price of Oak Table 2" never answers "price of Oak Table 3".

What lineage does not cover: a row the answer did not draw on (a new product, say) that would now
be retrieved. Such an answer stays cached until one of its own rows changes; this is the cache's
documented trade-off (docs/RAG.md), and `rag.cache.enabled = false` removes it.
"""

from __future__ import annotations

import hashlib
import json
import re

from psycopg.types.json import Jsonb

LOCK_CLASS = 1885824611  # first key of the per-table advisory locks shared with the trigger
_WORD = re.compile(r"\w+", re.UNICODE)


def normalise(question: str) -> str:
    """Lower case, single spaces, no trailing punctuation: the exact-match key."""
    return " ".join(question.lower().split()).rstrip(" ?!.。？！")


def key_hash(tenant: str, reader: str, question: str) -> bytes:
    """The exact-match key: SHA-256 of (tenant, reader, normalised question), so no length can break the index."""
    return hashlib.sha256(json.dumps([tenant, reader, normalise(question)]).encode()).digest()


def salient(question: str) -> str:
    """Numbers, identifiers and capitalised names (past the first word): what a similar question must share."""
    words = _WORD.findall(question)
    keep = {w.lower() for i, w in enumerate(words)
            if any(ch.isdigit() for ch in w) or (i > 0 and w[:1].isupper()) or not w.isascii()}
    return " ".join(sorted(keep))


def lookup(conn, tenant: str, reader: str, question: str, qvec, index_id: int, similarity: float) -> dict | None:
    """A cached result for this question (exact, then similar), counting the hit or the miss."""
    row = conn.execute(
        "select id, result from pgfresh.answer_cache where key_hash = %s and tenant = %s",  # tenant: docs/SCALE.md
        (key_hash(tenant, reader, question), tenant)).fetchone()
    if row is None and qvec is not None and similarity < 1.0:
        row = conn.execute(
            "select id, result from (select id, result, 1 - (qvec <=> %s) as sim from pgfresh.answer_cache"
            " where tenant = %s and reader = %s and index_id = %s and salient = %s and qvec is not null"
            " order by qvec <=> %s limit 1) s where sim >= %s",
            (qvec, tenant, reader, index_id, salient(question), qvec, similarity)).fetchone()
    if row is None:
        _count(conn, "cache_misses")
        return None
    conn.execute("update pgfresh.answer_cache set hits = hits + 1 where id = %s and tenant = %s", (row[0], tenant))
    _count(conn, "cache_hits")
    return row[1]


def store(conn, tenant: str, reader: str, question: str, qvec, index_id: int, result: dict,
          sources: list[tuple[str, str, str]]) -> bool:
    """Cache `result` with its lineage; False (and nothing stored) if a source changed meanwhile."""
    if not sources:
        return False  # an answer drawn on no row could never be invalidated
    tbls, keys, lsns = [s[0] for s in sources], [s[1] for s in sources], [s[2] for s in sources]
    with conn.transaction():
        hashes = [r[0] for r in conn.execute(
            "select distinct hashtext(t) from unnest(%s::text[]) t order by 1", (tbls,))]
        for h in hashes:  # the order the trigger takes them in, so neither side can deadlock
            conn.execute("select pg_advisory_xact_lock_shared(%s, %s)", (LOCK_CLASS, h))
        changed = conn.execute(
            "select count(*) from unnest(%s::text[], %s::text[], %s::pg_lsn[]) s(tbl, key, lsn)"
            " left join pgfresh.rows r on r.tbl = s.tbl and r.key = s.key"
            " where r.tbl is null or r.deleted or r.lsn <> s.lsn", (tbls, keys, lsns)).fetchone()[0]
        if changed:
            _count(conn, "cache_refused_stale")
            return False
        entry = conn.execute(
            "insert into pgfresh.answer_cache (key_hash, tenant, reader, question, salient, index_id, qvec, result)"
            " values (%s, %s, %s, %s, %s, %s, %s, %s) on conflict (key_hash) do update set"
            " salient = excluded.salient, index_id = excluded.index_id, qvec = excluded.qvec,"
            " result = excluded.result, hits = 0, created_at = now() returning id",
            (key_hash(tenant, reader, question), tenant, reader, normalise(question), salient(question), index_id,
             qvec, Jsonb(result))).fetchone()[0]
        conn.execute("delete from pgfresh.answer_cache_sources where entry_id = %s", (entry,))
        conn.execute(
            "insert into pgfresh.answer_cache_sources (entry_id, tbl, key, lsn)"
            " select %s, tbl, key, lsn from unnest(%s::text[], %s::text[], %s::pg_lsn[]) s(tbl, key, lsn)"
            " on conflict do nothing", (entry, tbls, keys, lsns))
        _count(conn, "cache_stores")
    return True


def _count(conn, name: str, n: int = 1) -> None:
    conn.execute("update pgfresh.rag_counters set value = value + %s where name = %s", (n, name))


def clear(conn) -> int:
    """Drop every cache entry (e.g. after changing the reader); returns how many."""
    return conn.execute("delete from pgfresh.answer_cache").rowcount
