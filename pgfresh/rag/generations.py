"""Index generations: which embedder built the index, and the switch to a new one.

A generation is a set of documents embedded by one embedder (name + version), with its own partial
HNSW index. Search reads the single 'active' generation. When `[rag]` names another embedder, the
index worker creates a 'building' generation, keeps it current with every change (as it keeps the
active one), fills it from the active generation's documents in the background, and when every
document is there switches the two in one transaction: search moves from the old vectors to the
new ones between two queries. The old generation is then deleted in small batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from psycopg import sql

from pgfresh.rag import embed

_LOCK = 0x70676669  # advisory lock key: one process changes generations at a time
HNSW_BUILD_LOCK = 0x70676668  # advisory lock class: one worker builds a generation's HNSW index at a time


@dataclass
class Generation:
    id: int
    embedder: str
    version: str
    dim: int
    state: str
    backfill_tbl: str | None = None
    backfill_key: str | None = None
    model: embed.Embedder | None = None  # None: this installation cannot load its embedder any more

    def vector_sql(self, column: str = "embedding") -> sql.Composable:
        """`column::vector(dim)`: the expression this generation's HNSW index is built on."""
        return sql.SQL("{}::vector({})").format(sql.Identifier(column), sql.Literal(self.dim))


def hnsw_index_name(gen_id: int) -> str:
    return f"documents_hnsw_{gen_id}"


def live(conn) -> tuple[Generation | None, Generation | None]:
    """(active, building) generations as stored, without their embedders."""
    active = building = None
    for row in conn.execute(
        "select id, embedder, embedder_version, dim, state, backfill_tbl, backfill_key"
        " from pgfresh.rag_indexes where state in ('active', 'building')"
    ):
        g = Generation(*row)
        if g.state == "active":
            active = g
        else:
            building = g
    return active, building


def ensure(conn, config) -> tuple[Generation, Generation | None]:
    """Make the stored generations match the configured embedder; return (active, building).

    No generation yet: the configured embedder's becomes active at once. The active one was built by
    another embedder: a building generation for the configured one (created here if needed).
    """
    model = embed.load(config.rag, config.data_dir)
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (_LOCK,))
        active, building = live(conn)
        wanted = (model.name, model.version)
        if active is None:
            active = _create(conn, model, "active")
        elif (active.embedder, active.version) == wanted:
            if building is not None:  # the configuration went back to the active embedder
                _retire(conn, building)
                building = None
        elif building is None or (building.embedder, building.version) != wanted:
            if building is not None:
                _retire(conn, building)
            building = _create(conn, model, "building")
    for g in (active, building):
        if g is not None:
            _ensure_hnsw(conn, g, config.rag)
            g.model = model if (g.embedder, g.version) == wanted else embed.find(config.rag, config.data_dir,
                                                                                  g.embedder, g.version)
    return active, building


def _create(conn, model, state: str) -> Generation:
    gid = conn.execute(
        "insert into pgfresh.rag_indexes (embedder, embedder_version, dim, state, activated_at)"
        " values (%s, %s, %s, %s, case when %s = 'active' then now() end) returning id",
        (model.name, model.version, model.dim, state, state)).fetchone()[0]
    return Generation(gid, model.name, model.version, model.dim, state)


def _retire(conn, g: Generation) -> None:
    conn.execute("update pgfresh.rag_indexes set state = 'retired', retired_at = now() where id = %s", (g.id,))


def _ensure_hnsw(conn, g: Generation, rag: dict) -> None:
    """Create the generation's partial HNSW index (concurrently: writers are not blocked).

    Several index workers may start at once (one per source, or several syncs): one builds, the
    others wait for it, polling a session advisory lock outside any transaction (a waiting
    statement would hold a snapshot the concurrent build waits for: two builds at once deadlock).
    """
    name = hnsw_index_name(g.id)
    query = ("select i.indisvalid from pg_index i join pg_class c on c.oid = i.indexrelid"
             " join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'pgfresh' and c.relname = %s")
    valid = conn.execute(query, (name,)).fetchone()
    if valid and valid[0]:
        return
    while not conn.execute("select pg_try_advisory_lock(%s, %s)", (HNSW_BUILD_LOCK, g.id)).fetchone()[0]:
        time.sleep(0.2)
    try:
        valid = conn.execute(query, (name,)).fetchone()
        if not (valid and valid[0]):
            _build_hnsw(conn, g, rag, name, valid)
    finally:
        conn.execute("select pg_advisory_unlock(%s, %s)", (HNSW_BUILD_LOCK, g.id))


def _build_hnsw(conn, g: Generation, rag: dict, name: str, valid) -> None:
    if valid:  # an interrupted concurrent build leaves an invalid index behind
        conn.execute(sql.SQL("drop index concurrently if exists pgfresh.{}").format(sql.Identifier(name)))
    limit = None
    if conn.info.server_version >= 170000:
        # The build scans every document of every generation in one internal transaction; only
        # pgfresh's own schema is involved, so the source's max_txn_seconds does not apply to it.
        limit = conn.execute("select current_setting('transaction_timeout')").fetchone()[0]
        conn.execute("select set_config('transaction_timeout', '0', false)")
    try:
        conn.execute(sql.SQL(
            "create index concurrently if not exists {} on pgfresh.documents using hnsw (({}) vector_cosine_ops)"
            " with (m = {}, ef_construction = {}) where index_id = {}"
        ).format(sql.Identifier(name), g.vector_sql(), sql.Literal(int(rag.get("hnsw_m", 16))),
                 sql.Literal(int(rag.get("hnsw_ef_construction", 64))), sql.Literal(g.id)))
    finally:
        if limit is not None:
            conn.execute("select set_config('transaction_timeout', %s, false)", (limit,))


def backfill_batch(conn, active: Generation, building: Generation, limit: int) -> int:
    """Embed the next `limit` active documents into the building generation; switch when complete.

    Returns how many documents were embedded (0 when idle). The texts are read and embedded outside
    any transaction; the insert re-checks, in its short transaction, that the active document still
    has the text that was embedded (a change in between wins, whichever generation it reached).
    """
    rows = conn.execute(
        "select tbl, key, text from pgfresh.documents where index_id = %s and (tbl, key) > (%s, %s)"
        " order by tbl, key limit %s",
        (active.id, building.backfill_tbl or "", building.backfill_key or "", limit)).fetchall()
    if not rows:
        _switch_if_complete(conn, active, building)
        return 0
    vectors = building.model.embed([r[2] for r in rows])
    with conn.transaction():
        conn.execute(
            "insert into pgfresh.documents (index_id, tbl, key, tenant, text, tsv, embedding, embedder,"
            " embedder_version, lsn, commit_time)"
            " select %s, a.tbl, a.key, a.tenant, a.text, a.tsv, v.embedding, %s, %s, a.lsn, a.commit_time"
            " from unnest(%s::text[], %s::text[], %s::text[], %s::vector[]) v(tbl, key, text, embedding)"
            " join pgfresh.documents a on a.index_id = %s and a.tbl = v.tbl and a.key = v.key and a.text = v.text"
            " on conflict (index_id, tbl, key) do nothing",
            (building.id, building.embedder, building.version, [r[0] for r in rows], [r[1] for r in rows],
             [r[2] for r in rows], list(vectors), active.id))
        conn.execute("update pgfresh.rag_indexes set backfill_tbl = %s, backfill_key = %s where id = %s",
                     (rows[-1][0], rows[-1][1], building.id))
    building.backfill_tbl, building.backfill_key = rows[-1][0], rows[-1][1]
    return len(rows)


def _switch_if_complete(conn, active: Generation, building: Generation) -> None:
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (_LOCK,))
        missing = conn.execute(
            "select count(*) from pgfresh.documents a where a.index_id = %s and not exists"
            " (select 1 from pgfresh.documents b where b.index_id = %s and b.tbl = a.tbl and b.key = a.key)",
            (active.id, building.id)).fetchone()[0]
        if missing:  # rows appeared behind the cursor: go round once more
            conn.execute("update pgfresh.rag_indexes set backfill_tbl = null, backfill_key = null where id = %s",
                         (building.id,))
            building.backfill_tbl = building.backfill_key = None
            return
        _retire(conn, active)
        conn.execute("update pgfresh.rag_indexes set state = 'active', activated_at = now() where id = %s",
                     (building.id,))


def cleanup_batch(conn, limit: int = 5000) -> int:
    """Delete a batch of a retired generation's documents; drop its HNSW index once it is empty."""
    retired = [r[0] for r in conn.execute("select id from pgfresh.rag_indexes where state = 'retired'"
                                          " and cleaned_at is null order by id")]
    for gid in retired:
        with conn.transaction():
            n = conn.execute(
                "delete from pgfresh.documents where ctid = any(array("
                " select ctid from pgfresh.documents where index_id = %s limit %s))", (gid, limit)).rowcount
            conn.execute("delete from pgfresh.answer_cache where index_id = %s", (gid,))
        if n:
            return n
        conn.execute(sql.SQL("drop index concurrently if exists pgfresh.{}").format(sql.Identifier(hnsw_index_name(gid))))
        conn.execute("update pgfresh.rag_indexes set cleaned_at = now() where id = %s", (gid,))
    return 0
