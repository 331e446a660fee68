"""`pgfresh status`: is capture current, is the source healthy, what did each stage do.

`collect(config)` returns a plain dict (the stable `--json` shape, docs/CLI.md):
With several `[[sources]]`, `sources` maps each source's name to its own `source`, `slot` and
`capture` sections (below); `pipelines` and the stages' sections are at the top, once.

- `capture`: of this config's pipeline (its slot): stored LSN, lag in bytes (server WAL position -
  stored) and seconds, per-table live and deleted row counts, snapshot progress, heartbeat, last
  error and reconnects of each worker, changes dropped per table no longer configured
  (`dropped_changes`);
- `pipelines`: every pipeline on this database: LSN, tables, live rows, change-log entries;
- `slot`: its state (ok, missing, lost, invalidated: then a warning naming `pgfresh resync`), WAL
  retained, wal_status, the server's max_slot_wal_keep_size, warnings past `source.wal_warn_mb` or
  when that bound is unlimited;
Slot, WAL and backends are read from the source; every position and count from the store.

- `source`: pgfresh backends on the pipeline's own database, and the oldest transaction age and
  xmin age any of them holds right now;
- one section per later stage that reports one (`pgfresh.stages`: gate, rag, train).
"""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from pgfresh import config as cfg
from pgfresh import db
from pgfresh import stages
from pgfresh.capture import setup
from pgfresh.capture.change import pipeline_of
from pgfresh.capture.pgoutput import format_lsn, parse_lsn


def collect(config: cfg.Config) -> dict:
    """Slot, WAL and backends from the source; positions and counts from the store.

    Several [[sources]]: `sources` holds each one's `source`, `slot` and `capture` sections; the
    pipelines and the stages (which span the sources) are reported once, at the top.
    """
    views = config.source_views()
    if len(views) == 1:
        return _collect(config)
    report = {"sources": {v.source.name: _collect(v, stages=False) for v in views}}
    with db.connect_store(config, "status", autocommit=True) as conn:
        if setup.has_state(conn) and conn.execute("select to_regclass('pgfresh.tables') is not null").fetchone()[0]:
            report["pipelines"] = _pipelines(conn)
            _stages(conn, report)
    return report


def _stages(conn, report: dict) -> None:
    report.update(stages.status(conn))


def _collect(config: cfg.Config, stages: bool = True) -> dict:
    """One source's report (with the stages' sections when `stages`)."""
    dsn = setup.resolve_dsn(config)
    with db.connect(dsn, "status", autocommit=True) as source, db.connect_store(config, "status", autocommit=True) as conn:
        has_schema = setup.has_state(conn)
        stored = conn.execute("select lsn::text from pgfresh.sink_progress where pipeline = %s and sink = 'rows'",
                              (pipeline_of(config),)).fetchone() if has_schema else None
        report = {"source": _source(source, conn.info.backend_pid), "slot": _slot(source, config, stored)}
        if not has_schema:
            state = "not initialised: run `pgfresh sync`"
            if not setup.same_database(source, conn) and setup.has_state(source):
                state = f"pgfresh's state is still in the source database: {setup.MIGRATE_HINT}"
            report["capture"] = {"state": state}
            return report
        wal_now = source.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        has_pipelines = conn.execute("select to_regclass('pgfresh.tables') is not null").fetchone()[0]
        if not has_pipelines:
            report["capture"] = {"state": "schema out of date: run `pgfresh sync` to migrate it"}
            return report
        report["capture"] = _capture(conn, pipeline_of(config), wal_now)
        if stages:
            report["pipelines"] = _pipelines(conn)
            _stages(conn, report)
    return report


def _source(conn, store_pid: int) -> dict:
    row = conn.execute(
        "select count(*), coalesce(extract(epoch from max(now() - xact_start)), 0),"
        " coalesce(max(age(backend_xmin)), 0) from pg_stat_activity"
        " where application_name like 'pgfresh-%%' and pid <> pg_backend_pid() and datname = current_database()"
        " and pid <> %s", (store_pid,)  # status's own store connection, when the store is the source database
    ).fetchone()
    return {
        "pgfresh_backends": row[0],
        "oldest_xact_seconds": round(float(row[1]), 3),
        "oldest_xmin_age_xids": int(row[2]),
        "server_version": conn.info.server_version,
    }


def _slot(conn, config: cfg.Config, stored) -> dict:
    """The slot: state (ok | missing | lost | invalidated), WAL it retains, the server's bound, warnings."""
    slot = config.source.slot
    health = setup.slot_health(conn, slot)
    keep_mb = setup.wal_keep_size_mb(conn)
    out = {"name": slot, "exists": health.state != "missing", "state": health.state,
           "invalidation_reason": health.reason, "max_slot_wal_keep_size_mb": keep_mb}
    warnings = []
    if not health.usable and (stored or health.state != "missing"):
        warnings.append(setup.slot_lost_message(health, format_lsn(parse_lsn(stored[0])) if stored else "none"))
    limit = config.source.max_slot_wal_keep_size_mb
    if keep_mb < 0:
        warnings.append("max_slot_wal_keep_size is unlimited: a stopped pgfresh could fill the primary's disk; "
                        "set it (e.g. ALTER SYSTEM SET max_slot_wal_keep_size = '10GB')")
    elif limit and keep_mb > limit:
        warnings.append(f"max_slot_wal_keep_size is {keep_mb} MB, more than source.max_slot_wal_keep_size_mb = {limit}")
    if health.state == "missing":
        out["warnings"] = warnings
        return out
    row = conn.execute(
        "select active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, safe_wal_size,"
        " current_setting('max_slot_wal_keep_size')"
        " from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
    retained = int(row[1] or 0) if row else 0
    out.update({
        "active": row[0] if row else False, "wal_status": health.wal_status,
        "retained_wal_bytes": retained, "unconfirmed_bytes": int(row[2] or 0) if row else 0,
        "safe_wal_size_bytes": row[3] if row else None, "max_slot_wal_keep_size": row[4] if row else None,
    })
    if retained > config.source.wal_warn_mb * 1024 * 1024:
        warnings.append(f"slot retains {retained // 2**20} MB of WAL (warn at {config.source.wal_warn_mb} MB): "
                        "is pgfresh sync running?")
    if health.wal_status == "unreserved":
        warnings.append("slot wal_status is unreserved: WAL pgfresh still needs is past max_slot_wal_keep_size and "
                        "goes at the next checkpoint; start pgfresh sync now")
    out["warnings"] = warnings
    return out


def _capture(conn, pipeline: str, wal_now: str) -> dict:
    lsn = conn.execute("select lsn::text, pg_wal_lsn_diff(%s::pg_lsn, lsn)::bigint from pgfresh.sink_progress"
                       " where pipeline = %s and sink = 'rows'", (wal_now, pipeline)).fetchone()
    tables = {
        t: {"rows": live, "deleted": dead}
        for t, live, dead in conn.execute(
            "select tbl, count(*) filter (where not deleted), count(*) filter (where deleted) from pgfresh.rows"
            " where pipeline = %s group by tbl", (pipeline,))
    }
    for t, done, read, last in conn.execute("select tbl, done, rows_read, finished_at from pgfresh.snapshot_progress"
                                            " where pipeline = %s", (pipeline,)):
        tables.setdefault(t, {"rows": 0, "deleted": 0})["snapshot"] = {"done": done, "rows_read": read, "finished_at": last}
    # Lag in seconds is measured by capture itself (commit time -> applied) and kept in its heartbeat.
    info = conn.execute("select info from pgfresh.workers where pipeline = %s and name like 'capture%%'",
                        (pipeline,)).fetchone()
    lag_seconds = float((info[0] or {}).get("lag_seconds", 0.0)) if info else None
    workers = {
        name: {"pid": pid, "heartbeat": hb, "last_error": err, "last_error_at": err_at, "info": info,
               "reconnects": reconnects}
        for name, pid, hb, err, err_at, info, reconnects in conn.execute(
            # reconnects: migration 006; read through to_jsonb so status works before sync applied it
            "select name, pid, heartbeat, last_error, last_error_at, info,"
            " coalesce((to_jsonb(w) ->> 'reconnects')::bigint, 0) from pgfresh.workers w where pipeline = %s"
            " order by name", (pipeline,))
    }
    consumers = {n: s for n, s in conn.execute("select name, seq from pgfresh.consumers where pipeline = %s",
                                               (pipeline,))}
    log_head = conn.execute("select coalesce(max(seq), 0) from pgfresh.changes where pipeline = %s",
                            (pipeline,)).fetchone()[0]
    dropped = dict(conn.execute("select tbl, changes from pgfresh.dropped_changes where pipeline = %s order by tbl",
                                (pipeline,)).fetchall())
    return {
        "pipeline": pipeline,
        "dropped_changes": dropped,
        "lsn": lsn[0] if lsn else None,
        "lag_bytes": int(lsn[1]) if lsn else None,
        "lag_seconds": None if lag_seconds is None else round(lag_seconds, 3),
        "tables": tables,
        "workers": workers,
        "change_log": {"head": log_head, "consumers": consumers},
    }


def _pipelines(conn) -> dict:
    """Every pipeline on this database (each its own slot): position, tables, rows, change-log entries."""
    out: dict[str, dict] = {}
    for p, lsn in conn.execute("select pipeline, lsn::text from pgfresh.sink_progress where sink = 'rows'"):
        out[p] = {"lsn": lsn, "tables": [], "rows": 0, "change_log": 0, "dropped_changes": 0}
    for p, tbl in conn.execute("select pipeline, tbl from pgfresh.tables where configured order by tbl"):
        out.setdefault(p, {"lsn": None, "tables": [], "rows": 0, "change_log": 0, "dropped_changes": 0})["tables"].append(tbl)
    for field, query in (
            ("rows", "select pipeline, count(*) from pgfresh.rows where not deleted group by 1"),
            ("change_log", "select pipeline, count(*) from pgfresh.changes group by 1"),
            ("dropped_changes", "select pipeline, sum(changes)::bigint from pgfresh.dropped_changes group by 1")):
        for p, n in conn.execute(query):
            if p in out:
                out[p][field] = int(n)
    return out


def show(report: dict, console) -> None:
    """Human-readable status. Values (names, errors, counts) are escaped: only our labels are markup."""
    for name, one in report.get("sources", {}).items():
        console.print(f"[bold]source {escape(name)}[/]")
        show(one, console)
    cap = report.get("capture", {})
    if "sources" in report:
        _show_stages(report, console)
        return
    slot = report.get("slot", {})
    src = report.get("source", {})
    console.print(f"[bold]capture[/] pipeline {escape(str(cap.get('pipeline')))} lsn {cap.get('lsn')}  lag {cap.get('lag_bytes')} bytes / {cap.get('lag_seconds')} s")
    if slot.get("exists"):
        console.print(f"[bold]slot[/] {escape(str(slot['name']))} {slot['state']} active={slot['active']} "
                      f"wal_status={slot['wal_status']} retained {slot['retained_wal_bytes'] / 2**20:.1f} MB")
    else:
        console.print(f"[bold]slot[/] {escape(str(slot.get('name')))} missing")
    for w in slot.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    console.print(f"[bold]source[/] oldest pgfresh transaction {src.get('oldest_xact_seconds')} s, "
                  f"xmin age {src.get('oldest_xmin_age_xids')}")
    if cap.get("tables"):
        t = Table("table", "rows", "deleted", "snapshot")
        for name, v in sorted(cap["tables"].items()):
            snap = v.get("snapshot", {})
            t.add_row(escape(name), str(v["rows"]), str(v["deleted"]), "done" if snap.get("done") else f"{snap.get('rows_read', 0)} read")
        console.print(t)
    for name, n in cap.get("dropped_changes", {}).items():
        console.print(f"[yellow]dropped:[/] {n} changes of {escape(name)} (no longer in pgfresh.toml)")
    others = [p for p in report.get("pipelines", {}) if p != cap.get("pipeline")]
    if others:
        console.print(f"other pipelines on this database: {', '.join(sorted(others))}", markup=False)
    for name, w in cap.get("workers", {}).items():
        err = f" last error: {w['last_error']}" if w["last_error"] else ""
        again = f" reconnects {w['reconnects']}" if w.get("reconnects") else ""
        console.print(escape(f"worker {name}: heartbeat {w['heartbeat']}{again}{err}"), highlight=False)
    _show_stages(report, console)


def _show_stages(report: dict, console) -> None:
    for stage in stages.STAGES:
        if stage.name in report:
            console.print(f"[bold]{stage.name}[/] {escape(str(report[stage.name]))}")
