"""The 'index' worker: the change log becomes searchable documents, exactly once, within about a second.

Two threads, each with its own connection to the store, so that embedding and the document writes
overlap the capture loop's database work (torch, the tokenizer and psycopg all release the GIL):

1. admit (the caller's thread, in `step`: the loop of `pgfresh.consume.Consumer`): read the next
   changes of consumer 'index' from `pgfresh.changes`, pass them through the quality gate
   (`Gate(config, 'rag')`, which quarantines or holds back what it must, and renders each row it
   accepts to document text once, with this worker's `render`), append them to
   `pgfresh.index_queue` (`write`), advance the consumer; one short transaction.
2. apply (the worker's 'pgfresh-index-apply' thread, one job at a time, started by `step`): until the
   queue is empty, take the newest queued version of each row at the head of the queue (older
   versions of the same row are consumed with it: a hot row is embedded once per batch, not once
   per change), embed it outside any transaction with the embedder of every live generation (the
   active one, and a building one during a re-embedding), then in one transaction delete exactly
   those queue entries and upsert/delete the documents, recording for each streamed change its
   commit -> searchable delay in `pgfresh.rag_freshness`. Then one batch of background
   re-embedding or cleanup. Every embedding call of the worker runs in this thread (a tokenizer is
   not safe to share between threads).

A crash anywhere leaves either the change unread, or the entry queued: it is done again, never
twice (the queue entry and the document write commit together). A version admitted while an older
one of the same row is being embedded stays queued and is applied after it (the delete consumes
queue ids up to the embedded one only). Deletes and truncates remove the documents (the gate never
holds a tombstone back). An error in the apply thread is raised by the next `step`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime

from pgvector.psycopg import register_vector
from psycopg import Rollback, sql

from pgfresh import db, render
from pgfresh.capture.change import Change
from pgfresh.capture.pgoutput import format_lsn
from pgfresh.consume import Consumer
from pgfresh.gate import Admitted, Gate, Rendered
from pgfresh.rag import generations
from pgfresh.rag.lexical import TSVECTOR_SQL, bigram_text

CONSUMER = "index"
WAIT_SECONDS = 0.01  # how long an idle `step` waits for the apply job before reporting it busy
JOB_SECONDS = 2.0  # an apply job stops taking batches after this, so background work is never starved


class IndexWorker(Consumer):
    """Consumer 'index' of the change log (path 'rag'); runs inside `pgfresh sync` (or alone, for tests)."""

    name = CONSUMER
    path = "rag"

    def __init__(self, config, dsn: str | None = None):
        self.rag = config.rag
        super().__init__(config, dsn, batch=int(self.rag.get("index_batch_changes", 1000)))
        self.apply_conn = None  # the apply thread's own connection
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future | None = None
        self._queued_during_job = False  # admitted entries the running job may have missed
        self.active = self.building = None
        self.batch_docs = int(self.rag.get("index_batch_docs", 128))
        self.text_config = self.rag.get("text_search_config", "english")

    def connect(self):
        if self.conn is None:
            super().connect()
        return self.conn

    def opened(self, conn) -> None:
        self._prepare(conn)
        self.active, self.building = generations.ensure(conn, self.config)
        self.apply_conn = self._prepare(db.connect(self.dsn or db.store_dsn(self.config), "index", autocommit=True,
                                                   max_txn_seconds=self.config.source.max_txn_seconds))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pgfresh-index-apply")

    @staticmethod
    def _prepare(conn):
        # Commits do not wait for the WAL flush: a store crash can lose the last of them, and it
        # loses them whole, with the consumer position and queue entries they moved (WAL keeps
        # their order), so the changes are read and applied again: exactly once still. Each index
        # transaction saves an fsync (the commits were a third of the worker's time, measured).
        conn.execute("set synchronous_commit = off")
        register_vector(conn)
        return conn

    # -- 1. admit: the row's document text, made once (inside the gate), queued --------------------
    def render(self, table, change: Change) -> Rendered:
        text = render.render_document(table, change.row)
        return Rendered(text, text, text)

    def write(self, conn, gate: Gate, admitted: list[Admitted]) -> int:
        entries = []
        for a in admitted:
            c = a.change
            op = {"delete": "delete", "truncate": "truncate"}.get(c.op, "upsert")
            entries.append((c.table, c.key_text if op != "truncate" else "[]", c.tenant, op,
                            a.rendered.payload if op == "upsert" else None, format_lsn(c.lsn), c.commit_time,
                            c.op != "read"))
        with conn.cursor() as cur:
            cur.executemany(
                "insert into pgfresh.index_queue (tbl, key, tenant, op, text, lsn, commit_time, live)"
                " values (%s, %s, %s, %s, %s, %s::pg_lsn, %s, %s)", entries)
        if self._job is not None:
            self._queued_during_job = True
        return len(entries)

    # -- 2 + 3. embed, apply (the apply thread) --------------------------------------------------
    def after_step(self, admitted: int) -> int:
        """Apply the queue (and one batch of background re-embedding or cleanup) in the apply thread,
        overlapping the caller's next work. 0 only when idle."""
        if self._job is not None and not admitted:
            _wait(self._job, WAIT_SECONDS)
        done = 0
        if self._job is None:
            done += 1  # nothing known of the queue yet: busy until a job has found it empty
        else:
            if not self._job.done():
                return done + 1
            n = self._job.result()  # raises what the apply thread raised
            done += n or int(self._queued_during_job)
            self._job = None
        self._queued_during_job = False
        self._job = self._pool.submit(self._apply_job)
        return done

    def _apply_job(self) -> int:
        """The apply thread's work: the queue until empty, then one background generation batch."""
        conn = self.apply_conn
        done, started = 0, time.monotonic()
        while (n := self._apply(conn)) > 0:
            done += n
            if time.monotonic() - started > JOB_SECONDS:
                break
        if self.building is not None:
            # ensure() built it for the configured embedder, which it has just loaded
            assert self.building.model is not None, "a building generation always has the configured embedder"
            n = generations.backfill_batch(conn, self.active, self.building, self.batch_docs)
            if n == 0:  # complete and switched, or rows appeared behind the cursor: not idle either way
                self.active, self.building = generations.ensure(conn, self.config)
                n = 1
            done += n
        else:
            done += generations.cleanup_batch(conn)
        return done

    def closing(self) -> None:
        """Wait for the apply job (its transaction commits or fails whole), then close its connection."""
        if self._pool is not None:
            job, self._job = self._job, None
            if job is not None:
                try:
                    job.result()
                except Exception:  # noqa: BLE001 - its transaction rolled back: the queue keeps it for the next start
                    pass
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.apply_conn is not None:
            self.apply_conn.close()
        self.apply_conn = None

    def _apply(self, conn) -> int:
        """Apply the rows at the head of the queue, each at its newest queued version."""
        head = conn.execute(
            "select id, tbl, key, op from pgfresh.index_queue order by id limit %s", (self.batch_docs,)).fetchall()
        if not head:
            return 0
        if head[0][3] == "truncate":
            return self._apply_truncate(conn, head[0])
        # A truncate applies alone, in order: only versions queued before it may be applied now.
        bound = conn.execute("select coalesce(min(id), 9223372036854775807) from pgfresh.index_queue"
                             " where op = 'truncate'").fetchone()[0]
        rows = sorted({(e[1], e[2]) for e in head if e[0] < bound})
        # The newest version of each row is the only one worth embedding; the older ones queued for
        # the same row are consumed with it (an update-heavy table is embedded per row, not per change).
        latest = conn.execute(
            "select distinct on (q.tbl, q.key) q.id, q.tbl, q.key, q.tenant, q.op, q.text, q.lsn::text, q.commit_time"
            " from pgfresh.index_queue q join unnest(%s::text[], %s::text[]) u(tbl, key) on q.tbl = u.tbl and q.key = u.key"
            " where q.id < %s order by q.tbl, q.key, q.id desc",
            ([r[0] for r in rows], [r[1] for r in rows], bound)).fetchall()
        upserts = [e for e in latest if e[4] == "upsert"]
        gens = [g for g in (self.active, self.building) if g is not None]
        vectors = {g.id: (g.model.embed([e[5] for e in upserts]) if g.model is not None and upserts else None)
                   for g in gens}
        with conn.transaction() as tx:
            consumed = conn.execute(
                "delete from pgfresh.index_queue q using unnest(%s::text[], %s::text[], %s::bigint[]) u(tbl, key, id)"
                " where q.tbl = u.tbl and q.key = u.key and q.id <= u.id returning q.id, q.commit_time, q.live",
                ([e[1] for e in latest], [e[2] for e in latest], [e[0] for e in latest])).fetchall()
            if not {e[0] for e in latest} <= {c[0] for c in consumed}:
                raise Rollback(tx)  # another index worker applied them meanwhile: its write stands
            for g in gens:
                self._write(conn, g, latest, upserts, vectors[g.id])
            ctimes = [c[1] for c in consumed if c[2] and c[1] is not None]
            if ctimes:
                _record_freshness(conn, ctimes)
        return len(consumed)

    def _apply_truncate(self, conn, entry) -> int:
        with conn.transaction():
            conn.execute("delete from pgfresh.index_queue where id = %s", (entry[0],))
            for g in (self.active, self.building):
                if g is not None:
                    conn.execute("delete from pgfresh.documents where index_id = %s and tbl = %s", (g.id, entry[1]))
        return 1

    def _write(self, conn, g, latest, upserts, vectors) -> None:
        deletes = [e for e in latest if e[4] == "delete"]
        if deletes:
            conn.execute("delete from pgfresh.documents d using unnest(%s::text[], %s::text[]) u(tbl, key)"
                         " where d.index_id = %s and d.tbl = u.tbl and d.key = u.key",
                         ([e[1] for e in deletes], [e[2] for e in deletes], g.id))
        if not upserts:
            return
        # One statement for the whole batch (arrays, unnest): per-row statements cost more in
        # executor start-up and round trips than the HNSW insert itself at these sizes.
        tsv = sql.SQL(TSVECTOR_SQL).format(cfg=sql.Literal(self.text_config), text=sql.SQL("u.text"),
                                           bigrams=sql.SQL("u.bigrams"))
        query = sql.SQL(
            "insert into pgfresh.documents as d (index_id, tbl, key, tenant, text, tsv, embedding, embedder,"
            " embedder_version, lsn, commit_time)"
            " select %(gid)s, u.tbl, u.key, u.tenant, u.text, {tsv}, u.embedding, %(embedder)s, %(version)s,"
            " u.lsn::pg_lsn, u.ctime"
            " from unnest(%(tbl)s::text[], %(key)s::text[], %(tenant)s::text[], %(text)s::text[], %(bigrams)s::text[],"
            " {embedding}::vector[], %(lsn)s::text[], %(ctime)s::timestamptz[])"
            " as u(tbl, key, tenant, text, bigrams, embedding, lsn, ctime)"
            " on conflict (index_id, tbl, key) do update set tenant = excluded.tenant, text = excluded.text,"
            " tsv = excluded.tsv, embedding = excluded.embedding, embedder = excluded.embedder,"
            " embedder_version = excluded.embedder_version, lsn = excluded.lsn, commit_time = excluded.commit_time,"
            " indexed_at = clock_timestamp()"
        ).format(tsv=tsv, embedding=sql.Placeholder(  # vectors travel binary: their text form cost 0.3 ms each
            "embedding", "b" if vectors is not None else "s"))
        conn.execute(query, {
            "gid": g.id, "embedder": g.embedder, "version": g.version,
            "tbl": [e[1] for e in upserts], "key": [e[2] for e in upserts], "tenant": [e[3] for e in upserts],
            "text": [e[5] for e in upserts], "bigrams": [bigram_text(e[5]) for e in upserts],
            "embedding": [None] * len(upserts) if vectors is None else list(vectors),
            "lsn": [e[6] for e in upserts], "ctime": [e[7] for e in upserts]})


def _wait(job: Future, seconds: float) -> None:
    try:
        job.exception(timeout=seconds)
    except TimeoutError:
        pass


def _record_freshness(conn, commit_times: list[datetime]) -> None:
    """Histogram of commit -> searchable milliseconds, measured just before this transaction commits."""
    conn.execute(
        "insert into pgfresh.rag_freshness (bucket, n)"
        " select b, count(*) from (select floor(ln(1 + greatest(0, extract(epoch from clock_timestamp() - ct))"
        " * 1000) / ln(1.1))::int as b from unnest(%s::timestamptz[]) as ct) s group by b"
        " on conflict (bucket) do update set n = pgfresh.rag_freshness.n + excluded.n",
        (commit_times,))
