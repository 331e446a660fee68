"""`pgfresh resync`: recover from a lost or invalidated replication slot without leaving ghosts.

When the slot is gone, the changes made since pgfresh's stored position are lost to the stream; a
plain new snapshot would bring inserts and updates back but leave rows deleted meanwhile live for
ever. Resync drops the unusable slot, creates a new one, queues every table for a new snapshot
(`rowstore.mark_resync`) and runs capture once: when a table's snapshot completes, the rows the new
snapshot did not see are deleted downstream (row store tombstones, change-log deletes, so documents,
facts and cache entries follow). Killed halfway, `pgfresh sync` (or resync again) finishes it.
"""

from __future__ import annotations

from pgfresh import config as cfg
from pgfresh import db
from pgfresh.capture import rowstore, setup, sync
from pgfresh.capture.change import pipeline_of
from pgfresh.capture.rowstore import register_tables


def run(config: cfg.Config, console=None) -> dict:
    """Re-create the slot, re-read every table, delete what the source no longer has. Returns counts.

    One source at a time: with several [[sources]], pass `config.for_source(name)`."""
    if len(config.sources) > 1:
        raise cfg.ConfigError([f"sources: resync one source at a time: pass --source NAME "
                               f"({', '.join(s.name for s in config.sources)})"], str(config.path))
    dsn = setup.resolve_dsn(config)
    limit = config.source.max_txn_seconds
    with db.connect(dsn, "resync", max_txn_seconds=limit, autocommit=True) as conn, \
            db.connect_store(config, "resync", max_txn_seconds=limit, autocommit=True) as store:
        infos = setup.check_source(conn, config)
        sync.check_stage_columns(config, infos)
        setup.check_wal_keep_size(conn, config)
        setup.check_store(conn, store, config)
        db.migrate(store)
        pipeline = pipeline_of(config)
        register_tables(store, pipeline, infos, str(config.path), source=conn)
        setup.ensure_publication(conn, config)
        slot_lsn = setup.recreate_slot(conn, config)
        rowstore.mark_resync(store, pipeline, list(infos), slot_lsn, source=conn)
    stats = sync.run(config, once=True, console=console)
    with db.connect_store(config, "resync", autocommit=True) as conn:
        tables = rowstore.resync_counts(conn, pipeline)
    stats.update(slot=config.source.slot, slot_lsn=slot_lsn, tables=tables,
                 deleted=sum(t["deleted"] or 0 for t in tables.values()))
    return stats
