"""`Gate`: what one model path ('rag' or 'train') may see of the captured changes.

A consumer calls `admit(conn, changes)` and `release_due(conn)` inside the transaction that also
advances its position in the change log, writes what they return to its sink, and commits. Every
change the gate is shown gets exactly one row in `pgfresh.gate_log` for the path, updated as the
change moves on:

    pending      waiting for its settle window, or for a final state (`final_when`)
    superseded   a newer version of the row arrived first (the newer one is what may enter)
    quarantined  a check rejected it: the row and the reason are in `pgfresh.quarantine`
    duplicate    it renders exactly as the version the path already has
    accepted     returned to the consumer, with PII removed from `row`

Order of decisions for an insert / update / snapshot read: settle (a burst of edits to one row
yields its last version), then the validators and the junk check on the raw row, then PII
removal, rendering (a row that cannot be rendered is quarantined as 'render') and dedup. Deletes
and truncates are accepted at once: a tombstone is never held back. Near-duplicates of another
key's text are accepted and reported (check 'near_duplicate' in the log).

The gate does not render rows itself: its consumer passes `render(table, change) -> Rendered` (the
text that decides dedup and near-duplicates, and the payload the consumer writes), which the gate
calls once per change it would accept, and what it accepts comes back as `Admitted(change,
rendered)`: the consumer writes `rendered.payload` and never renders the row again
(pgfresh/consume.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from psycopg.types.json import Jsonb

from pgfresh.capture.change import Change
from pgfresh.capture.pgoutput import format_lsn, parse_lsn
from pgfresh.configtypes import plain_table
from pgfresh.errors import ConfigError, RenderError
from pgfresh.gate.expr import ExprError
from pgfresh.gate.policy import Policy, parse_policy

NEAR_DUPLICATE_BITS = 3  # simhash bits that may differ; 4 bands of 16 bits find every pair within 3
NEAR_DUPLICATE_FETCH = 5000  # earlier texts sharing a band, read per batch at most
NEAR_DUPLICATE_PER_BAND = 32  # texts compared per band value at most

# The newest change after quarantined change q that this path admitted, holds, or saw delete the row:
# from gate_log, and from gate_seen / gate_pending, which still know it once retention pruned gate_log.
NEWER_SQL = """select max(x) from (values
    ((select max(l.seq) from pgfresh.gate_log l where l.path = q.path and l.tbl = q.tbl and l.key = q.key
       and l.seq > q.seq and l.outcome in ('accepted', 'pending', 'duplicate'))),
    ((select greatest(s.seq, s.deleted_seq) from pgfresh.gate_seen s
       where s.path = q.path and s.tbl = q.tbl and s.key = q.key)),
    ((select p.seq from pgfresh.gate_pending p where p.path = q.path and p.tbl = q.tbl and p.key = q.key))
    ) v(x) where x > q.seq"""


@dataclass(frozen=True, slots=True)
class Rendered:
    """A row as one path sees it: made by the consumer's `render`, once per change."""

    document: str  # the row's document text: near-duplicates are measured on it
    text: str  # everything the path derives from the row: equal text (same tenant) is a duplicate
    payload: Any  # what the consumer writes (its facts, its document text)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A change the gate let through; `rendered` is None for deletes and truncates (nothing to render)."""

    change: Change
    rendered: Rendered | None


def policy_for(table, path: str) -> Policy:
    """The gate policy of a configured table (a `TableConfig`) for one path."""
    problems: list[str] = []
    skip = set(table.key or []) | ({table.tenant} if table.tenant else set())
    policy = parse_policy(table.gate, path, f"tables.{table.name}.gate", problems, skip)
    if problems:
        raise ConfigError(problems)
    return policy


class _Decisions:
    """gate_log rows and quarantine rows of one call, written together at its end."""

    def __init__(self, path: str):
        self.path = path
        self.log: dict[int, tuple] = {}
        self.quarantine: list[tuple] = []

    def outcome(self, c: Change, outcome: str, check: str | None = None, detail: str | None = None, pii: int = 0):
        self.log[c.seq] = (self.path, c.seq, c.table, c.key_text, outcome, check, detail, pii)

    def reject(self, c: Change, check: str, reason: str, row: dict | None):
        self.outcome(c, "quarantined", check, reason)
        self.quarantine.append((self.path, c.seq, c.table, c.key_text, c.tenant, c.op, format_lsn(c.lsn), c.commit_time,
                                check, reason, Jsonb(row) if row is not None else None))

    def write(self, conn) -> None:
        with conn.cursor() as cur:
            if self.log:
                cur.executemany(
                    "insert into pgfresh.gate_log (path, seq, tbl, key, outcome, check_name, detail, pii_masked)"
                    " values (%s, %s, %s, %s, %s, %s, %s, %s) on conflict (path, seq) do update set"
                    " outcome = excluded.outcome, check_name = excluded.check_name, detail = excluded.detail,"
                    " pii_masked = excluded.pii_masked, decided_at = now()",
                    list(self.log.values()),
                )
            if self.quarantine:
                cur.executemany(
                    "insert into pgfresh.quarantine (path, seq, tbl, key, tenant, op, lsn, commit_time, check_name,"
                    " reason, row) values (%s, %s, %s, %s, %s, %s, %s::pg_lsn, %s, %s, %s, %s)",
                    self.quarantine,
                )


def _latest(changes: list[Change]) -> tuple[list[Change], list[tuple[Change, int]]]:
    """Split a batch into the last change of each row and the earlier ones it supersedes.

    A truncate supersedes every earlier change to its table in the batch.
    """
    survivors, superseded = [], []
    last_by_key: dict[tuple, int] = {}
    truncated_at: dict[str, int] = {}
    for c in reversed(changes):
        later = last_by_key.get((c.table, c.key_text)) or truncated_at.get(c.table)
        if later is not None:
            superseded.append((c, later))
            continue
        survivors.append(c)
        if c.op == "truncate":
            truncated_at[c.table] = c.seq
        else:
            last_by_key[(c.table, c.key_text)] = c.seq
    return survivors[::-1], superseded


# Bit-sliced counting: each byte of a 64-bit hash spread into 32-bit counters, so one big-integer
# addition per feature counts all 64 bit positions at once (a per-bit Python loop was the gate's
# hottest spot).
_SPREAD = [sum(((b >> j) & 1) << (32 * j) for j in range(8)) for b in range(256)]


def simhash(text: str) -> int:
    """64-bit simhash of a text's words and word pairs (signed, as PostgreSQL's bigint)."""
    words = re.findall(r"\w+", text.lower())
    features = words + [a + " " + b for a, b in zip(words, words[1:])]
    total = 0
    for f in features:
        h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "big")
        total += sum(_SPREAD[(h >> (8 * k)) & 255] << (256 * k) for k in range(8))
    half = len(features) / 2
    value = sum(1 << bit for bit in range(64) if (total >> (32 * bit)) & 0xFFFFFFFF > half)
    return value - (1 << 64) if value >= 1 << 63 else value


def _index(by_band: dict[int, list[tuple]], tbl: str, key: str, sim: int) -> None:
    # Near-duplicates are only reported, never rejected: a bounded look is enough. Templated rows
    # ("Product 17", "Product 18") share bands by the thousand; comparing each with all would be
    # quadratic.
    for band in _bands(sim):
        entries = by_band.setdefault(band, [])
        if len(entries) < NEAR_DUPLICATE_PER_BAND:
            entries.append((tbl, key, sim))


def _bands(h: int) -> list[int]:
    u = h & 0xFFFFFFFFFFFFFFFF
    return [(i << 16) | (u >> (16 * i) & 0xFFFF) for i in range(4)]


class Gate:
    """The quality gate of one path. See the module docstring for what each call promises."""

    def __init__(self, config, path: str, render: Callable[..., Rendered]):
        if path not in ("rag", "train"):
            raise ValueError(f"path must be 'rag' or 'train', not {path!r}")
        self.path = path
        self.render = render  # (table, change with PII removed) -> Rendered; raises RenderError
        self.tables = {t.name: t for t in config.tables}
        self.policies = {t.name: policy_for(t, path) for t in config.tables}
        self._default = parse_policy({}, path, "gate", [])
        self._position: int | None = None  # highest seq shown to admit() by this process

    def policy(self, tbl: str) -> Policy:
        return self.policies.get(tbl, self._default)

    # --- admit ------------------------------------------------------------------------------

    def admit(self, conn, changes: list[Change]) -> list[Admitted]:
        """Decide every change (in the caller's transaction); return those accepted now, by seq."""
        if not changes:
            return []
        self._position = max(self._position or 0, max(c.seq for c in changes))
        d = _Decisions(self.path)
        survivors, superseded = _latest(changes)
        for c, by in superseded:
            d.outcome(c, "superseded", detail=f"superseded by seq {by}")
        accepted, ready, waiting = [], [], []
        for c in survivors:
            if c.op == "truncate":
                self._supersede_pending(conn, d, c.seq, c.table, None)
                conn.execute("update pgfresh.gate_seen set deleted_seq = %s where path = %s and tbl = %s"
                             " and deleted_seq is null", (c.seq, self.path, c.table))
        rows = [c for c in survivors if c.op != "truncate"]
        if rows:
            self._supersede_pending(conn, d, None, None, rows)
        deletes = [c for c in rows if c.op == "delete"]
        if deletes:
            conn.execute(
                "update pgfresh.gate_seen s set deleted_seq = d.seq from unnest(%s::text[], %s::text[], %s::bigint[])"
                " as d(tbl, key, seq) where s.path = %s and s.tbl = d.tbl and s.key = d.key and s.deleted_seq is null",
                ([c.table for c in deletes], [c.key_text for c in deletes], [c.seq for c in deletes], self.path),
            )
        for c in survivors:
            if c.op in ("delete", "truncate"):
                d.outcome(c, "accepted")
                accepted.append(Admitted(c, None))
                continue
            hold = self._hold(c, d)
            if hold == "ready":
                ready.append(c)
            elif hold is not None:
                waiting.append((c, hold))
        self._park(conn, d, waiting)
        accepted += self._accept(conn, d, ready)
        d.write(conn)
        return sorted(accepted, key=lambda a: a.change.seq)

    def _hold(self, c: Change, d: _Decisions):
        """'ready', 'final' (wait for a final state), 'settle' (wait settle_seconds) or None (rejected)."""
        policy = self.policy(c.table)
        if policy.final_when is not None:
            try:
                final = policy.final_when(c.row or {}) is True
            except ExprError as exc:
                d.reject(c, "final_when", f"cannot evaluate {policy.final_when.text!r}: {exc}", self._safe_row(c))
                return None
            if policy.non_final == "wait" and not final:
                return "final"
            if final and not policy.settle_final:
                return "ready"
        # A snapshot read is the row as it already stood; only edits on the stream settle.
        if policy.settle_seconds > 0 and c.op != "read":
            return "settle"
        return "ready"

    def _supersede_pending(self, conn, d: _Decisions, by_seq, tbl, rows: list[Change] | None) -> None:
        """Remove pending versions that a newer change replaces, logging them 'superseded'."""
        if rows is None:
            cur = conn.execute("delete from pgfresh.gate_pending where path = %s and tbl = %s returning seq, tbl, key",
                               (self.path, tbl))
            newer = {}
        else:
            cur = conn.execute(
                "delete from pgfresh.gate_pending p using unnest(%s::text[], %s::text[]) as n(tbl, key)"
                " where p.path = %s and p.tbl = n.tbl and p.key = n.key returning p.seq, p.tbl, p.key",
                ([c.table for c in rows], [c.key_text for c in rows], self.path),
            )
            newer = {(c.table, c.key_text): c.seq for c in rows}
        for seq, t, key in cur.fetchall():
            d.log[seq] = (self.path, seq, t, key, "superseded", None,
                          f"superseded by seq {newer.get((t, key), by_seq)}", 0)

    def _park(self, conn, d: _Decisions, waiting: list[tuple[Change, str]]) -> None:
        if not waiting:
            return
        params = []
        for c, hold in waiting:
            # due_at null: waits for a final state; else settle_seconds after the source commit
            seconds = self.policy(c.table).settle_seconds if hold == "settle" else None
            params.append({"path": self.path, "tbl": c.table, "key": c.key_text, "seq": c.seq, "tenant": c.tenant,
                           "op": c.op, "row": Jsonb(c.row), "lsn": format_lsn(c.lsn), "ct": c.commit_time, "s": seconds})
            d.outcome(c, "pending", "settle" if hold == "settle" else "final_when",
                      "settle window" if hold == "settle" else "waiting for a final state")
        conn.cursor().executemany(
            "insert into pgfresh.gate_pending (path, tbl, key, seq, tenant, op, row, lsn, commit_time, due_at)"
            " values (%(path)s, %(tbl)s, %(key)s, %(seq)s, %(tenant)s, %(op)s, %(row)s, %(lsn)s::pg_lsn, %(ct)s,"
            " coalesce(%(ct)s::timestamptz, now()) + make_interval(secs => %(s)s::float8))"
            " on conflict (path, tbl, key) do update set seq = excluded.seq, tenant = excluded.tenant,"
            " op = excluded.op, row = excluded.row, lsn = excluded.lsn, commit_time = excluded.commit_time,"
            " due_at = excluded.due_at",
            params,
        )

    def _safe_row(self, c: Change) -> dict | None:
        return None if c.row is None else self.policy(c.table).pii.apply(c.row)[0]

    # --- accept: checks, PII, render, dedup ----------------------------------------------------

    def _accept(self, conn, d: _Decisions, changes: list[Change], released: bool = False) -> list[Admitted]:
        candidates = []
        for c in changes:
            policy = self.policy(c.table)
            table = self.tables.get(c.table)
            if table is not None and table.tenant and c.tenant is None:
                # Never shared: a row of a tenant table without a tenant would reach every tenant's slice.
                d.reject(c, "tenant", f"tenant column {table.tenant} is null", self._safe_row(c))
                continue
            if not released:
                failed = next(((chk.name, why) for chk in policy.checks if (why := chk.reject(c.row)) is not None), None)
                if failed:
                    d.reject(c, failed[0], failed[1], self._safe_row(c))
                    continue
            row, masked = policy.pii.apply(c.row)
            c = dataclasses.replace(c, row=row)
            try:
                rendered = self.render(self.tables.get(c.table) or plain_table(c.table), c)
            except RenderError as exc:
                d.reject(c, "render", str(exc), row)
                continue
            fingerprint = hashlib.sha256(f"{c.tenant}\x00{rendered.text}".encode()).hexdigest()
            candidates.append((c, rendered, masked, fingerprint, simhash(rendered.document)))
        if not candidates:
            return []
        seen = self._seen(conn, candidates)
        accepted, upserts = [], []
        for c, rendered, masked, fingerprint, sim in candidates:
            policy = self.policy(c.table)
            if policy.dedup and seen["fp"].get((c.table, c.key_text)) == fingerprint:
                d.outcome(c, "duplicate", "dedup", "renders exactly as the version already admitted", masked)
                continue
            near = self._near(c, sim, seen["by_band"]) if policy.near_duplicates else None
            d.outcome(c, "accepted", "near_duplicate" if near else None, near, masked)
            seen["fp"][(c.table, c.key_text)] = fingerprint
            _index(seen["by_band"], c.table, c.key_text, sim)
            upserts.append((self.path, c.table, c.key_text, c.seq, fingerprint, sim, _bands(sim), Jsonb(c.row)))
            accepted.append(Admitted(c, rendered))
        conn.cursor().executemany(
            "insert into pgfresh.gate_seen (path, tbl, key, seq, fingerprint, simhash, bands, row)"
            " values (%s, %s, %s, %s, %s, %s, %s, %s) on conflict (path, tbl, key) do update set seq = excluded.seq,"
            " fingerprint = excluded.fingerprint, simhash = excluded.simhash, bands = excluded.bands,"
            " row = excluded.row, deleted_seq = null",
            upserts,
        )
        return accepted

    def _seen(self, conn, candidates) -> dict:
        """Fingerprints of the rows being admitted, and simhashes sharing a band with any of them."""
        tbls = [c.table for c, *_ in candidates]
        keys = [c.key_text for c, *_ in candidates]
        fp = {(t, k): f for t, k, f in conn.execute(
            "select s.tbl, s.key, s.fingerprint from pgfresh.gate_seen s join unnest(%s::text[], %s::text[])"
            " as n(tbl, key) on s.tbl = n.tbl and s.key = n.key where s.path = %s and s.deleted_seq is null",
            (tbls, keys, self.path))}
        bands = sorted({b for *_, sim in candidates for b in _bands(sim)})
        by_band: dict[int, list[tuple]] = {}
        for tbl, key, sim in conn.execute(
                "select tbl, key, simhash from pgfresh.gate_seen where path = %s and deleted_seq is null"
                " and tbl = any(%s) and bands && %s::int[] limit %s",
                (self.path, sorted(set(tbls)), bands, NEAR_DUPLICATE_FETCH)):
            _index(by_band, tbl, key, sim)
        return {"fp": fp, "by_band": by_band}

    @staticmethod
    def _near(c: Change, sim: int, by_band: dict[int, list[tuple]]) -> str | None:
        for band in _bands(sim):
            for tbl, key, other in by_band.get(band, ()):
                if tbl == c.table and key != c.key_text:
                    distance = ((sim ^ other) & 0xFFFFFFFFFFFFFFFF).bit_count()
                    if distance <= NEAR_DUPLICATE_BITS:
                        return f"near-duplicate of key {key} (simhash distance {distance})"
        return None

    # --- release ------------------------------------------------------------------------------

    def release_due(self, conn, position: int | None = None, limit: int = 1000) -> list[Admitted]:
        """Changes that may enter now: settled pending rows and rows released from quarantine.

        `position`: how far the caller has read the change log (default: the highest seq this
        gate was shown). A pending row is released only when no change captured before its due
        time is still unread, so a lagging consumer cannot let an older version through.
        """
        d = _Decisions(self.path)
        accepted = self._readmit(conn, d, limit)
        position = position if position is not None else self._position
        horizon = None
        if position is not None:
            row = conn.execute("select captured_at from pgfresh.changes where seq > %s and tbl = any(%s)"
                               " order by seq limit 1", (position, list(self.tables))).fetchone()
            horizon = row[0] if row else None
        due = conn.execute(
            "delete from pgfresh.gate_pending p where (p.path, p.tbl, p.key) in (select path, tbl, key"
            " from pgfresh.gate_pending where path = %s and due_at <= least(now(), coalesce(%s::timestamptz, 'infinity'))"
            " and tbl = any(%s) order by due_at limit %s for update skip locked)"
            " returning p.tbl, p.key, p.seq, p.tenant, p.op, p.row, p.lsn::text, p.commit_time",
            (self.path, horizon, list(self.tables), limit),
        ).fetchall()
        changes = [_change(*r) for r in due]
        accepted += self._accept(conn, d, sorted(changes, key=lambda c: c.seq))
        d.write(conn)
        return sorted(accepted, key=lambda a: a.change.seq)

    def _readmit(self, conn, d: _Decisions, limit: int) -> list[Admitted]:
        rows = conn.execute(
            "select q.id, q.tbl, q.key, q.seq, q.tenant, q.op, q.row, q.lsn::text, q.commit_time,"
            f" ({NEWER_SQL}) as newer"
            " from pgfresh.quarantine q where q.path = %s and q.released_at is not null and q.readmitted_at is null"
            " and q.tbl = any(%s) order by q.seq limit %s for update skip locked",
            (self.path, list(self.tables), limit),
        ).fetchall()
        if not rows:
            return []
        fresh = {r[0]: _change(*r[1:9]) for r in rows if r[9] is None}
        notes = {r[0]: f"stale: a newer version (seq {r[9]}) was admitted" for r in rows if r[9] is not None}
        accepted = self._accept(conn, d, list(fresh.values()), released=True)
        for qid, c in fresh.items():
            notes[qid] = outcome = d.log[c.seq][4]
            if outcome == "accepted":
                d.log[c.seq] = d.log[c.seq][:6] + (f"released from quarantine #{qid}",) + d.log[c.seq][7:]
        conn.cursor().executemany(
            "update pgfresh.quarantine set readmitted_at = now(), release_note = %s where id = %s",
            [(note, qid) for qid, note in notes.items()],
        )
        return accepted

    def reject_accepted(self, conn, change: Change, check: str, reason: str) -> None:
        """Quarantine a change this gate accepted but its consumer could not use (same transaction).

        Its dedup entry goes too, so that the next identical version is not taken for a duplicate
        of one that never reached the sink.
        """
        d = _Decisions(self.path)
        d.reject(change, check, reason, change.row)
        d.write(conn)
        conn.execute("delete from pgfresh.gate_seen where path = %s and tbl = %s and key = %s and seq = %s",
                     (self.path, change.table, change.key_text, change.seq))

    def note(self, conn, change: Change, check: str, detail: str) -> None:
        """Record something a consumer could not do for an accepted change (it stays accepted)."""
        conn.execute("update pgfresh.gate_log set check_name = %s, detail = %s where path = %s and seq = %s",
                     (check, detail, self.path, change.seq))

    # --- lineage for the facts of removed rows ----------------------------------------------

    def removed_rows(self, conn, change: Change) -> dict[str, dict]:
        """The rows (by key text) that a delete or truncate took away, as this path last admitted them."""
        query = "select key, row from pgfresh.gate_seen where path = %s and tbl = %s and deleted_seq = %s"
        params: tuple = (self.path, change.table, change.seq)
        if change.op == "delete":
            query += " and key = %s"
            params += (change.key_text,)
        return {k: r for k, r in conn.execute(query, params) if r is not None}

    def settling_seconds(self, conn) -> float | None:
        """Seconds until the next pending row of this path is due (None: nothing waits on time)."""
        row = conn.execute("select extract(epoch from min(due_at) - now()) from pgfresh.gate_pending"
                           " where path = %s and due_at is not null and tbl = any(%s)",
                           (self.path, list(self.tables))).fetchone()
        return None if row[0] is None else max(0.0, float(row[0]))


def _change(tbl, key, seq, tenant, op, row, lsn, commit_time) -> Change:
    return Change(tbl, op, json.loads(key), row, parse_lsn(lsn), commit_time, tenant=tenant, seq=seq)
