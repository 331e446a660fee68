"""`pgfresh store migrate`: move the state of an installation that kept it in the source.

Before issue 10, schema `pgfresh` lived in the source database. `migrate_from_source` moves it to
the store: the store's schema is created by the same migrations (the source's schema is brought to
the same version first), every table is copied (COPY, in foreign-key order, the store's user
triggers off while copying so the copy changes nothing on its way), identity and serial sequences
continue from the source's values, and the row counts of every table are compared inside the store's transaction. Only after
that transaction has committed is schema `pgfresh` dropped from the source. A failure at any step
leaves the source as it was and the store without the copy; nothing is lost silently.

It refuses while `pgfresh sync` runs (the slot is active), when the store is the source database,
and when the store already holds pgfresh's state, unless that state is this copy: a run whose drop
step failed (after the copy committed) is finished by running it again, which compares the row
counts of every table and the stored positions once more and then drops the schema from the source.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgfresh import config as cfg
from pgfresh import db
from pgfresh.capture import setup
from pgfresh.errors import PgfreshError


class StoreMigrationError(PgfreshError):
    """The state cannot be moved as asked; the message says why and what to do."""


def _tables(conn) -> list[str]:
    """Tables of schema pgfresh in foreign-key order (a referenced table before the tables that reference it)."""
    names = [r[0] for r in conn.execute(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'pgfresh' and c.relkind in ('r', 'p') and not c.relispartition order by 1")]
    deps: dict[str, set[str]] = {n: set() for n in names}
    for child, parent in conn.execute(
            "select c.relname, p.relname from pg_constraint k join pg_class c on c.oid = k.conrelid"
            " join pg_class p on p.oid = k.confrelid join pg_namespace n on n.oid = c.relnamespace"
            " where k.contype = 'f' and n.nspname = 'pgfresh'"):
        if child != parent and child in deps:
            deps[child].add(parent)
    ordered: list[str] = []
    while deps:
        ready = sorted(n for n, d in deps.items() if not d - set(ordered))
        if not ready:  # a cycle: keep the rest in name order (the FKs then fail loudly, in the store)
            ready = sorted(deps)
        for n in ready:
            ordered.append(n)
            deps.pop(n)
    return [n for n in ordered if n != "migrations"]


def _columns(conn, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 and not attisdropped"
        " and attgenerated = '' order by attnum", (f"pgfresh.{table}",))]


def migrate_from_source(config: cfg.Config, console=None) -> dict:
    """Copy schema pgfresh from the source to the store, verify the counts, then drop it from the source.

    Returns {"tables": {name: rows}, "rows": total, "dropped_from_source": True}.
    """
    say = (lambda text: console.print(text, highlight=False, soft_wrap=True, markup=False)) if console else (lambda t: None)
    with db.connect(setup.resolve_dsn(config), "store-migrate", autocommit=True) as src, \
            db.connect_store(config, "store-migrate", autocommit=True) as dst:
        if setup.same_database(src, dst):
            raise StoreMigrationError("[store] dsn names the source database itself: set store.dsn to another "
                                      "database (or remove it for the embedded store) before `pgfresh store migrate`")
        if not setup.has_state(src):
            raise StoreMigrationError(f"the source database {src.info.dbname} holds no schema pgfresh: nothing to "
                                      "move (`pgfresh sync` keeps its state in the store already)")
        copied = setup.has_state(dst) and dst.execute("select exists (select 1 from pgfresh.sink_progress)").fetchone()[0]
        if copied and not _same_state(src, dst):
            raise StoreMigrationError(f"the store database {dst.info.dbname} already holds pgfresh's state, and it "
                                      "differs from the source's: point store.dsn at an empty database, or drop "
                                      "schema pgfresh there first (or, if the store's state is the one to keep, "
                                      "DROP SCHEMA pgfresh CASCADE on the source)")
        active = src.execute("select slot_name from pg_replication_slots where database = current_database()"
                             " and active").fetchall()
        if active:
            raise StoreMigrationError(f"replication slot {active[0][0]} is in use: stop pgfresh sync before "
                                      "`pgfresh store migrate`")
        if copied:  # an earlier run copied and verified, then failed to drop: finish it
            counts = _counts(dst, _tables(dst))
            say("the store already holds this copy (counts and positions match the source): dropping it from the source")
            _drop_from_source(src, sum(counts.values()))
            say(f"dropped schema pgfresh from the source database {src.info.dbname}")
            return {"tables": counts, "rows": sum(counts.values()), "dropped_from_source": True}
        db.migrate(src)  # the old schema at the same version as the store's (it is dropped below)
        db.migrate(dst)
        tables = _tables(dst)
        counts: dict[str, int] = {}
        src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one consistent view of the old state
        with src.transaction(), dst.transaction():
            for t in tables:
                dst.execute(sql.SQL("alter table pgfresh.{} disable trigger user").format(sql.Identifier(t)))
            dst.execute(sql.SQL("truncate {}").format(sql.SQL(", ").join(
                sql.Identifier("pgfresh", t) for t in tables)))
            in_source = {r[0] for r in src.execute(
                "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                " where n.nspname = 'pgfresh' and c.relkind in ('r', 'p')")}
            for t in tables:
                if t not in in_source:  # a deferred migration (no pgvector there): nothing to copy
                    counts[t] = 0
                    continue
                cols = sql.SQL(", ").join(sql.Identifier(c) for c in _columns(dst, t))
                ident = sql.Identifier("pgfresh", t)
                with src.cursor().copy(sql.SQL("copy (select {} from {}) to stdout").format(cols, ident)) as out, \
                        dst.cursor().copy(sql.SQL("copy {} ({}) from stdin").format(ident, cols)) as into:
                    for chunk in out:
                        into.write(chunk)
                n_src = src.execute(sql.SQL("select count(*) from {}").format(ident)).fetchone()[0]
                n_dst = dst.execute(sql.SQL("select count(*) from {}").format(ident)).fetchone()[0]
                if n_src != n_dst:
                    raise StoreMigrationError(f"pgfresh.{t}: {n_src} rows in the source, {n_dst} copied: nothing was "
                                              "changed (the store's copy is rolled back); report this as a bug")
                counts[t] = n_dst
                # Identity and serial sequences continue where the source's stood (not at max(): the change
                # log is pruned, and consumer positions may be past its last remaining entry).
                for (col,) in dst.execute(
                        "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0"
                        " and not attisdropped and pg_get_serial_sequence(%s, attname) is not null",
                        (f"pgfresh.{t}", f"pgfresh.{t}")).fetchall():
                    (last,) = src.execute("select pg_sequence_last_value(pg_get_serial_sequence(%s, %s)::regclass)",
                                          (f"pgfresh.{t}", col)).fetchone()
                    if last is not None:  # None: never used in the source, the store's is as fresh
                        dst.execute("select setval(pg_get_serial_sequence(%s, %s), %s)", (f"pgfresh.{t}", col, last))
                say(f"copied pgfresh.{t}: {n_dst} rows")
            for t in tables:
                dst.execute(sql.SQL("alter table pgfresh.{} enable trigger user").format(sql.Identifier(t)))
        src.isolation_level = None
        # The store's copy has committed and matched, table by table: only now leave the source.
        _drop_from_source(src, sum(counts.values()))
        say(f"dropped schema pgfresh from the source database {src.info.dbname}")
    return {"tables": counts, "rows": sum(counts.values()), "dropped_from_source": True}


def _counts(conn, tables: list[str]) -> dict[str, int]:
    present = {r[0] for r in conn.execute(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'pgfresh' and c.relkind in ('r', 'p')")}
    return {t: conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier("pgfresh", t))).fetchone()[0]
            if t in present else 0 for t in tables}


def _same_state(src, dst) -> bool:
    """Is the store's state a copy of the source's (every table's row count and every stored position equal)?"""
    tables = _tables(dst)
    positions = "select pipeline, sink, lsn::text from pgfresh.sink_progress order by 1, 2"
    return _counts(src, tables) == _counts(dst, tables) and \
        src.execute(positions).fetchall() == dst.execute(positions).fetchall()


def _drop_from_source(src, rows: int) -> None:
    try:
        src.execute("drop schema pgfresh cascade")
    except psycopg.Error as exc:  # any failure here: the copy is safe in the store, the source unchanged
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreMigrationError(f"copied and verified {rows} rows into the store, but dropping schema pgfresh from "
                                  f"the source failed ({first}): fix that, then run `pgfresh store migrate` again "
                                  "(it checks the copy once more and finishes)") from None
