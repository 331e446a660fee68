"""Reading and releasing quarantine, and the gate's counts for `pgfresh status`.

`release` only marks a quarantined change as released; the path's worker re-admits it on its next
step (skipping the validators and the junk check, still removing PII, rendering and deduplicating),
in the transaction that writes it to the sink. A change whose row has since been admitted in a
newer version is not re-admitted (that would bring back an old version): `release` refuses it.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from pgfresh import db
from pgfresh.errors import PgfreshError
from pgfresh.gate.admission import NEWER_SQL

_COLUMNS = ("id", "path", "tbl", "key", "tenant", "op", "seq", "lsn", "commit_time", "check_name", "reason", "row",
            "created_at", "released_at", "readmitted_at", "release_note")


class QuarantineError(PgfreshError):
    """A quarantine entry that does not exist or cannot be released."""


def _ready(conn) -> bool:
    return conn.execute("select to_regclass('pgfresh.quarantine') is not null").fetchone()[0]


def list_quarantine(conn, table: str | None = None, check: str | None = None, path: str | None = None,
                    include_released: bool = False, limit: int = 100) -> list[dict]:
    """Quarantined changes, newest first, as dicts with the columns of pgfresh.quarantine."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise QuarantineError(f"limit: expected an integer >= 0, got {limit!r}")
    if not _ready(conn):
        return []
    if table and "." not in table:
        table = f"public.{table}"
    rows = conn.execute(
        "select id, path, tbl, key, tenant, op, seq, lsn::text, commit_time, check_name, reason, row, created_at,"
        " released_at, readmitted_at, release_note from pgfresh.quarantine"
        " where (%(t)s::text is null or tbl = %(t)s) and (%(c)s::text is null or check_name = %(c)s)"
        " and (%(p)s::text is null or path = %(p)s) and (%(r)s or released_at is null)"
        " order by id desc limit %(n)s",
        {"t": table, "c": check, "p": path, "r": include_released, "n": limit},
    ).fetchall()
    return [dict(zip(_COLUMNS, r)) for r in rows]


def release(conn, qid: int) -> dict:
    """Mark quarantine entry `qid` released, so its path's worker re-admits it; returns the entry."""
    if not _ready(conn):
        raise QuarantineError(f"no quarantine entry {qid}: pgfresh has not run here yet (pgfresh sync)")
    with conn.transaction():
        row = conn.execute(
            "select id, path, tbl, key, seq, released_at from pgfresh.quarantine where id = %s for update", (qid,)
        ).fetchone()
        if row is None:
            raise QuarantineError(f"no quarantine entry {qid}: list them with `pgfresh quarantine`")
        _, path, tbl, key, seq, released_at = row
        if released_at is not None:
            raise QuarantineError(f"quarantine entry {qid} was already released at {released_at:%Y-%m-%d %H:%M:%S}")
        newer = conn.execute(f"select ({NEWER_SQL}) from pgfresh.quarantine q where q.id = %s", (qid,)).fetchone()[0]
        if newer is not None:
            raise QuarantineError(
                f"quarantine entry {qid} is stale: a newer version of {tbl} {key} (change {newer}) was admitted"
                f" to {path}; releasing this one would bring back an old version"
            )
        conn.execute("update pgfresh.quarantine set released_at = now() where id = %s", (qid,))
    return list_quarantine_entry(conn, qid)


def list_quarantine_entry(conn, qid: int) -> dict:
    rows = conn.execute(
        "select id, path, tbl, key, tenant, op, seq, lsn::text, commit_time, check_name, reason, row, created_at,"
        " released_at, readmitted_at, release_note from pgfresh.quarantine where id = %s", (qid,)).fetchall()
    if not rows:
        raise QuarantineError(f"no quarantine entry {qid}: list them with `pgfresh quarantine`")
    return dict(zip(_COLUMNS, rows[0]))


def status_counts(conn) -> dict:
    """Per path: changes by outcome, and per check how many it quarantined, released or reported.

        {"rag": {"accepted": 120, "pending": 0, "superseded": 4, "duplicate": 7, "quarantined": 3,
                 "pii_masked": 12, "checks": {"junk": {"quarantined": 2, "released": 1},
                                              "near_duplicate": {"reported": 1}}},
         "train": {...}}
    """
    out: dict = {}
    if not conn.execute("select to_regclass('pgfresh.gate_log') is not null").fetchone()[0]:
        return out
    for path in ("rag", "train"):
        out[path] = {k: 0 for k in ("accepted", "pending", "superseded", "duplicate", "quarantined", "pii_masked")}
        out[path]["checks"] = {}
    for path, outcome, n, masked in conn.execute(
            "select path, outcome, count(*), coalesce(sum(pii_masked), 0) from pgfresh.gate_log group by 1, 2"):
        out[path][outcome] = n
        out[path]["pii_masked"] += int(masked)
    for path, n in conn.execute("select path, count(*) from pgfresh.gate_log where outcome = 'accepted'"
                                " and check_name = 'near_duplicate' group by 1"):
        out[path]["checks"]["near_duplicate"] = {"reported": n}
    for path, check, n, released in conn.execute(
            "select path, check_name, count(*), count(released_at) from pgfresh.quarantine group by 1, 2"):
        out[path]["checks"].setdefault(check, {}).update(quarantined=n, released=released)
    return out


# --- the CLI's entry points: a connection of their own, then one of the functions above --------

def _connect(config):
    return db.connect(db.store_dsn(config), "quarantine", autocommit=True)


def entries(config, table: str | None = None, check: str | None = None, path: str | None = None,
            include_released: bool = False, limit: int = 100) -> list[dict]:
    """`pgfresh quarantine`: the quarantined changes of the configured database."""
    with _connect(config) as conn:
        return list_quarantine(conn, table, check, path, include_released, limit)


def release_entry(config, qid: int) -> dict:
    """`pgfresh quarantine release ID`."""
    with _connect(config) as conn:
        return release(conn, qid)


def show(items: list[dict], console) -> None:
    """A table of quarantine entries for people (the --json form carries every column)."""
    if not items:
        console.print("quarantine is empty")
        return
    t = Table("id", "path", "table", "key", "check", "reason", "created", "released", box=None)
    for e in items:
        released = "" if e["released_at"] is None else (e["release_note"] or "pending re-admission")
        # Text, not markup: a key or reason like "[/bold]" is data and must print as it is.
        t.add_row(*(Text(str(v)) for v in (e["id"], e["path"], e["tbl"], e["key"], e["check_name"], e["reason"][:80],
                                            f"{e['created_at']:%Y-%m-%d %H:%M:%S}", released)))
    console.print(t)
