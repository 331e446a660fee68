"""`pgfresh status`: is capture current, is the source healthy, what did each stage do.

`collect(config)` returns a plain dict (the stable `--json` shape, docs/CLI.md):
- `capture`: stored LSN, lag in bytes (server WAL position - stored) and seconds, per-table live
  and deleted row counts, snapshot progress, heartbeat and last error of each worker;
- `slot`: WAL retained by the slot, its wal_status, and a warning past `source.wal_warn_mb`;
- `source`: the oldest transaction age and xmin age any pgfresh backend holds right now;
- one section per later stage that exposes `status_counts(conn)` (gate, rag, train).
"""

from __future__ import annotations

from pgfresh import config as cfg
from pgfresh import db

STAGE_STATUS = ("pgfresh.gate", "pgfresh.rag", "pgfresh.train")


def collect(config: cfg.Config) -> dict:
    dsn = db.store_dsn(config)
    with db.connect(dsn, "status", autocommit=True) as conn:
        has_schema = conn.execute("select to_regclass('pgfresh.sink_progress') is not null").fetchone()[0]
        report = {"source": _source(conn), "slot": _slot(conn, config)}
        if not has_schema:
            report["capture"] = {"state": "not initialised: run `pgfresh sync`"}
            return report
        report["capture"] = _capture(conn)
        for name in STAGE_STATUS:
            for counts in cfg.stage_functions([name], "status_counts"):
                report[name.rsplit(".", 1)[1]] = counts(conn)
    return report


def _source(conn) -> dict:
    row = conn.execute(
        "select count(*), coalesce(extract(epoch from max(now() - xact_start)), 0),"
        " coalesce(max(age(backend_xmin)), 0) from pg_stat_activity"
        " where application_name like 'pgfresh-%%' and pid <> pg_backend_pid()"
    ).fetchone()
    return {
        "pgfresh_backends": row[0],
        "oldest_xact_seconds": round(float(row[1]), 3),
        "oldest_xmin_age_xids": int(row[2]),
        "server_version": conn.info.server_version,
    }


def _slot(conn, config: cfg.Config) -> dict:
    row = conn.execute(
        "select active, wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, safe_wal_size,"
        " current_setting('max_slot_wal_keep_size')"
        " from pg_replication_slots where slot_name = %s", (config.source.slot,)).fetchone()
    if row is None:
        return {"name": config.source.slot, "exists": False}
    retained = int(row[2] or 0)
    out = {
        "name": config.source.slot, "exists": True, "active": row[0], "wal_status": row[1],
        "retained_wal_bytes": retained, "unconfirmed_bytes": int(row[3] or 0),
        "safe_wal_size_bytes": row[4], "max_slot_wal_keep_size": row[5],
    }
    warnings = []
    if retained > config.source.wal_warn_mb * 1024 * 1024:
        warnings.append(f"slot retains {retained // 2**20} MB of WAL (warn at {config.source.wal_warn_mb} MB): "
                        "is pgfresh sync running?")
    if row[5] == "-1":
        warnings.append("max_slot_wal_keep_size is unlimited: a stopped pgfresh could fill the primary's disk; "
                        "set it (e.g. ALTER SYSTEM SET max_slot_wal_keep_size = '10GB')")
    if row[1] in ("unreserved", "lost"):
        warnings.append(f"slot wal_status is {row[1]}: WAL needed by pgfresh is being removed; re-run the snapshot")
    out["warnings"] = warnings
    return out


def _capture(conn) -> dict:
    lsn = conn.execute("select lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), lsn)::bigint from pgfresh.sink_progress"
                       " where sink = 'rows'").fetchone()
    tables = {
        t: {"rows": live, "deleted": dead}
        for t, live, dead in conn.execute(
            "select tbl, count(*) filter (where not deleted), count(*) filter (where deleted) from pgfresh.rows group by tbl")
    }
    for t, done, read, last in conn.execute("select tbl, done, rows_read, finished_at from pgfresh.snapshot_progress"):
        tables.setdefault(t, {"rows": 0, "deleted": 0})["snapshot"] = {"done": done, "rows_read": read, "finished_at": last}
    # Lag in seconds is measured by capture itself (commit time -> applied) and kept in its heartbeat.
    info = conn.execute("select info from pgfresh.workers where name = 'capture'").fetchone()
    lag_seconds = float((info[0] or {}).get("lag_seconds", 0.0)) if info else None
    workers = {
        name: {"pid": pid, "heartbeat": hb, "last_error": err, "last_error_at": err_at, "info": info}
        for name, pid, hb, err, err_at, info in conn.execute(
            "select name, pid, heartbeat, last_error, last_error_at, info from pgfresh.workers order by name")
    }
    consumers = {n: s for n, s in conn.execute("select name, seq from pgfresh.consumers")}
    log_head = conn.execute("select coalesce(max(seq), 0) from pgfresh.changes").fetchone()[0]
    return {
        "lsn": lsn[0] if lsn else None,
        "lag_bytes": int(lsn[1]) if lsn else None,
        "lag_seconds": None if lag_seconds is None else round(lag_seconds, 3),
        "tables": tables,
        "workers": workers,
        "change_log": {"head": log_head, "consumers": consumers},
    }


def show(report: dict, console) -> None:
    """Human-readable status."""
    from rich.table import Table

    cap = report.get("capture", {})
    slot = report.get("slot", {})
    src = report.get("source", {})
    console.print(f"[bold]capture[/] lsn {cap.get('lsn')}  lag {cap.get('lag_bytes')} bytes / {cap.get('lag_seconds')} s")
    if slot.get("exists"):
        console.print(f"[bold]slot[/] {slot['name']} active={slot['active']} wal_status={slot['wal_status']} "
                      f"retained {slot['retained_wal_bytes'] / 2**20:.1f} MB")
        for w in slot.get("warnings", []):
            console.print(f"[yellow]warning:[/] {w}")
    console.print(f"[bold]source[/] oldest pgfresh transaction {src.get('oldest_xact_seconds')} s, "
                  f"xmin age {src.get('oldest_xmin_age_xids')}")
    if cap.get("tables"):
        t = Table("table", "rows", "deleted", "snapshot")
        for name, v in sorted(cap["tables"].items()):
            snap = v.get("snapshot", {})
            t.add_row(name, str(v["rows"]), str(v["deleted"]), "done" if snap.get("done") else f"{snap.get('rows_read', 0)} read")
        console.print(t)
    for name, w in cap.get("workers", {}).items():
        err = f" last error: {w['last_error']}" if w["last_error"] else ""
        console.print(f"worker {name}: heartbeat {w['heartbeat']}{err}")
    for stage in ("gate", "rag", "train"):
        if stage in report:
            console.print(f"[bold]{stage}[/] {report[stage]}")
