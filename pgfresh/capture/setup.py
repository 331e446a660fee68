"""Preparing a source database for capture, and refusing clearly when it cannot be used.

`check_source` verifies, before anything is created, everything capture needs: `wal_level=logical`,
a role allowed to replicate, every configured table present with a usable (unique) key, and every
privilege the role needs today (docs/PRIVILEGES.md). Each failure is one line saying what is wrong
and how to fix it. `ensure_publication` / `ensure_slot` then create the publication (exactly the
configured tables, never schema pgfresh: tables added to or removed from the config are added to or
dropped from it) and the pgoutput slot; `slot_health` tells a usable slot from a missing, lost or
invalidated one, and `ensure_slot` refuses to re-create one silently while pgfresh holds a stored
position. `check_wal_keep_size` holds the server to `source.max_slot_wal_keep_size_mb`.
`init_project` writes a starting pgfresh.toml from the database's tables.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from pgfresh import config as cfg
from pgfresh.errors import ConfigError, SourceError


@dataclass
class TableInfo:
    """What capture knows of one source table."""

    name: str  # schema.table
    columns: list[str]
    type_oids: list[int]
    types: list[str]  # format_type names, for casts
    key: list[str]
    tenant: str | None
    relation: str | None = None  # schema.table in the source, where `name` (the stored name) differs

    @property
    def ident(self) -> sql.Composed:
        schema, table = (self.relation or self.name).split(".", 1)
        return sql.Identifier(schema, table)


def resolve_dsn(config: cfg.Config) -> str:
    """The source DSN: the configured one, or the embedded server (started if needed)."""
    if config.source.dsn:
        return config.source.dsn
    from pgfresh.embedded import EmbeddedServer

    return EmbeddedServer(config.data_dir / "pg").start()


def same_database(source: psycopg.Connection, store: psycopg.Connection) -> bool:
    """Are both connections on one database of one server? (The store may be the source by choice.)"""
    started, dbname = source.execute("select pg_postmaster_start_time()::text, current_database()").fetchone()
    found = store.execute(
        "select pg_postmaster_start_time()::text = %s and current_database() = %s"
        " and exists (select 1 from pg_stat_activity where pid = %s)", (started, dbname, source.info.backend_pid)
    ).fetchone()[0]
    for c in (source, store):
        if not c.autocommit:
            c.rollback()
    return found


def has_state(conn: psycopg.Connection) -> bool:
    """Does this database hold pgfresh's schema (a row store)?"""
    found = conn.execute("select to_regclass('pgfresh.sink_progress') is not null").fetchone()[0]
    if not conn.autocommit:
        conn.rollback()
    return found


MIGRATE_HINT = ("run `pgfresh store migrate` to move it to the store (copied, verified, then dropped from the "
                "source), or to start over DROP SCHEMA pgfresh CASCADE on the source")


def check_store(source: psycopg.Connection, store: psycopg.Connection, config: cfg.Config) -> None:
    """Refuse a store that cannot hold pgfresh's state, and a source still holding it (issue 10 migration)."""
    if same_database(source, store):
        return  # [store] dsn names the source database: the operator chose to keep the state there
    if has_state(source) and not has_state(store):
        raise SourceError(f"the source database {source.info.dbname} still holds pgfresh's state (schema pgfresh) "
                          f"and the store has none: {MIGRATE_HINT}")
    row = store.execute("select has_database_privilege(current_database(), 'CREATE'),"
                        " to_regnamespace('pgfresh') is not null").fetchone()
    if not store.autocommit:
        store.rollback()
    if not row[0] and not row[1]:
        raise SourceError(f"role {store.info.user} may not create schema pgfresh in the store database "
                          f"{store.info.dbname}: GRANT CREATE ON DATABASE {_ident(store, store.info.dbname)} "
                          f"TO {_ident(store, store.info.user)}, or set store.dsn to a database it owns")


def check_server(conn: psycopg.Connection) -> None:
    wal_level = conn.execute("show wal_level").fetchone()[0]
    if wal_level != "logical":
        raise SourceError(
            f"wal_level is '{wal_level}', capture needs 'logical': run ALTER SYSTEM SET wal_level = logical "
            "and restart PostgreSQL"
        )
    superuser, replication = conn.execute(
        "select rolsuper, rolreplication from pg_roles where rolname = current_user"
    ).fetchone()
    if not (superuser or replication):
        user = conn.info.user
        raise SourceError(
            f"role {user} may not replicate: run ALTER ROLE {user} WITH REPLICATION "
            "(the other privileges pgfresh needs: docs/PRIVILEGES.md, pgfresh/examples/grant.sql)"
        )
    if conn.info.server_version < 140000:
        raise SourceError(f"PostgreSQL {conn.info.server_version // 10000} is too old: pgfresh needs 14 or newer")


def table_info(conn: psycopg.Connection, table: cfg.TableConfig) -> TableInfo:
    """Columns, types and key of a configured table; SourceError if it is missing or has no usable key."""
    row = conn.execute(
        "select c.oid, c.relreplident, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = %s and c.relname = %s",
        (table.schema, table.table),
    ).fetchone()
    if row is None or row[2] not in ("r", "p"):
        raise SourceError(f"table {table.name} does not exist: create it or remove it from pgfresh.toml")
    oid, replident, _ = row
    cols = conn.execute(
        "select attname, atttypid::int, format_type(atttypid, atttypmod) from pg_attribute"
        " where attrelid = %s and attnum > 0 and not attisdropped order by attnum",
        (oid,),
    ).fetchall()
    names = [c[0] for c in cols]
    pk = [r[0] for r in conn.execute(
        "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid"
        " and a.attnum = any(i.indkey) where i.indrelid = %s and i.indisprimary"
        " order by array_position(i.indkey::int2[], a.attnum)",
        (oid,),
    )]
    key = table.key or pk
    if not key:
        raise SourceError(
            f"table {table.name} has no primary key: add one, or set key = [...] for it in pgfresh.toml "
            f"and run ALTER TABLE {table.relation} REPLICA IDENTITY FULL"
        )
    if table.key and table.key != pk and replident != "f":
        raise SourceError(
            f"table {table.name}: key {table.key} is not its primary key, so deletes would not carry it: "
            f"run ALTER TABLE {table.relation} REPLICA IDENTITY FULL"
        )
    if replident == "n":
        raise SourceError(
            f"table {table.name} has REPLICA IDENTITY NOTHING, so updates and deletes carry no key: "
            f"run ALTER TABLE {table.relation} REPLICA IDENTITY DEFAULT"
        )
    missing = [c for c in key + ([table.tenant] if table.tenant else []) if c not in names]
    if missing:
        raise SourceError(f"table {table.name} has no column {', '.join(missing)}: fix key/tenant in pgfresh.toml")
    if table.key and not (pk and set(pk) <= set(key)):
        # A key that is not unique would merge rows (and fail the row store's upsert mid-snapshot):
        # it must contain the columns of a unique index over NOT NULL columns.
        unique = conn.execute(
            "select exists (select 1 from pg_index i where i.indrelid = %s and i.indisunique and i.indpred is null"
            " and i.indexprs is null and not exists (select 1 from pg_attribute a where a.attrelid = i.indrelid"
            " and a.attnum = any(i.indkey) and (not a.attnotnull or not a.attname = any(%s::text[]))))",
            (oid, key)).fetchone()[0]
        if not unique:
            cols = ", ".join(key)
            raise SourceError(
                f"table {table.name}: key {key} is not unique (no unique index on NOT NULL columns among {cols}), "
                f"so two rows could share it: set key to unique columns, or CREATE UNIQUE INDEX ON {table.relation} ({cols})"
            )
    return TableInfo(table.name, names, [c[1] for c in cols], [c[2] for c in cols], key, table.tenant,
                     table.relation_name)


def check_source(conn: psycopg.Connection, config: cfg.Config) -> dict[str, TableInfo]:
    """Everything capture needs, checked before anything is created."""
    check_server(conn)
    if not config.tables:
        raise ConfigError(["tables: no [[tables]] configured; run `pgfresh init` or add one"], str(config.path))
    infos = {t.name: table_info(conn, t) for t in config.tables}
    check_privileges(conn, config)
    if publication_made_by_dba(conn, config):
        check_dba_publication(conn, config)
    conn.rollback()
    return infos


def _ident(conn, *names: str) -> str:
    return sql.Identifier(*names).as_string(conn)


def missing_privileges(conn: psycopg.Connection, config: cfg.Config) -> list[str]:
    """Each privilege the current role lacks for what pgfresh does today, as 'what (why): the GRANT that fixes it'.

    pgfresh keeps its state in the store, never in the source, so beyond REPLICATION (check_server)
    and SELECT on the tables it needs only what the publication takes: CREATE on the database to
    create it, and ownership of it and of the tables it adds to change it. docs/PRIVILEGES.md.
    """
    user, dbname = conn.info.user, conn.info.dbname
    role, database = _ident(conn, user), _ident(conn, dbname)
    if conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]:
        return []
    missing: list[str] = []
    can_create_in_db = conn.execute("select has_database_privilege(current_database(), 'CREATE')").fetchone()[0]
    pub = config.source.publication
    pub_row = conn.execute("select pg_has_role(pubowner, 'USAGE') from pg_publication where pubname = %s",
                           (pub,)).fetchone()
    if pub_row is None and not can_create_in_db:
        missing.append(f"CREATE on database {dbname} (to create publication {pub}): "
                       f"GRANT CREATE ON DATABASE {database} TO {role}")
    in_pub = set() if pub_row is None else {f"{s}.{t}" for s, t in conn.execute(
        "select schemaname, tablename from pg_publication_tables where pubname = %s", (pub,))}
    dba_made = pub_row is not None and not pub_row[0]  # used as it is, never altered (ensure_publication)
    for t in config.tables:
        select_ok, owner_ok = conn.execute(
            "select has_table_privilege(c.oid, 'SELECT'), pg_has_role(c.relowner, 'USAGE') from pg_class c"
            " join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s",
            (t.schema, t.table)).fetchone()
        if not select_ok:
            missing.append(f"SELECT on {t.relation}: GRANT SELECT ON {_ident(conn, t.schema, t.table)} TO {role}")
        if t.relation not in in_pub and not owner_ok and not dba_made:
            missing.append(f"ownership of {t.relation} (to add it to publication {pub}): have its owner run "
                           + (f"CREATE PUBLICATION {_ident(conn, pub)} FOR TABLE ..." if pub_row is None else
                              f"ALTER PUBLICATION {_ident(conn, pub)} ADD TABLE {_ident(conn, t.schema, t.table)}"))
    return missing


def check_privileges(conn: psycopg.Connection, config: cfg.Config) -> None:
    """SourceError naming every privilege the role lacks, in one line, before anything is created."""
    missing = missing_privileges(conn, config)
    if missing:
        raise SourceError(f"role {conn.info.user} lacks what pgfresh needs: {'; '.join(missing)} "
                          "(an administrator can run pgfresh/examples/grant.sql; see docs/PRIVILEGES.md)")


def publication_made_by_dba(conn: psycopg.Connection, config: cfg.Config) -> bool:
    """Does source.publication exist and belong to a role other than pgfresh's? Then a DBA made it
    (least privilege: docs/PRIVILEGES.md) and pgfresh uses it as it is, never altering it."""
    row = conn.execute("select pg_has_role(pubowner, 'USAGE') from pg_publication where pubname = %s",
                       (config.source.publication,)).fetchone()
    if not conn.autocommit:
        conn.rollback()
    return row is not None and not row[0]


def check_dba_publication(conn: psycopg.Connection, config: cfg.Config) -> list[str]:
    """A DBA-made publication must cover every configured table: SourceError naming the missing ones."""
    pub = config.source.publication
    have = {f"{s}.{t}" for s, t in conn.execute(
        "select schemaname, tablename from pg_publication_tables where pubname = %s", (pub,))}
    missing = [t for t in config.tables if t.relation not in have]
    if missing:
        names = ", ".join(t.relation for t in missing)
        idents = ", ".join(_ident(conn, t.schema, t.table) for t in missing)
        raise SourceError(f"publication {pub} (made by its owner, not by pgfresh) lacks {names}: have its owner run "
                          f"ALTER PUBLICATION {_ident(conn, pub)} ADD TABLE {idents}, or remove "
                          f"{'them' if len(missing) > 1 else 'it'} from pgfresh.toml")
    return sorted(have - {t.relation for t in config.tables})


def ensure_publication(conn: psycopg.Connection, config: cfg.Config) -> tuple[list[str], list[str]]:
    """Make the publication hold exactly the configured tables. Returns (tables added, tables removed).

    A table removed from pgfresh.toml leaves the publication, so its changes stop arriving (the
    few already in the WAL before this are dropped by the row store, with a count). A publication
    another role owns (made by a DBA) is never altered: it must cover the tables (check_dba_publication);
    changes of its other tables are dropped by the row store, with a count.
    """
    pub = config.source.publication
    if publication_made_by_dba(conn, config):
        check_dba_publication(conn, config)
        return [], []
    with conn.transaction():
        exists = conn.execute("select 1 from pg_publication where pubname = %s", (pub,)).fetchone()
        names = [sql.Identifier(t.schema, t.table) for t in config.tables]
        if not exists:
            conn.execute(sql.SQL("create publication {} for table {}").format(sql.Identifier(pub), sql.SQL(", ").join(names)))
            return [t.relation for t in config.tables], []
        have = {f"{s}.{t}": (s, t) for s, t in conn.execute(
            "select schemaname, tablename from pg_publication_tables where pubname = %s", (pub,))}
        added = [t for t in config.tables if t.relation not in have]
        removed = sorted(set(have) - {t.relation for t in config.tables})
        for t in added:
            conn.execute(sql.SQL("alter publication {} add table {}").format(
                sql.Identifier(pub), sql.Identifier(t.schema, t.table)))
        for name in removed:
            conn.execute(sql.SQL("alter publication {} drop table {}").format(
                sql.Identifier(pub), sql.Identifier(*have[name])))
    return [t.relation for t in added], removed


@dataclass
class SlotHealth:
    """What the source says about pgfresh's slot. `state`: ok | missing | lost | invalidated."""

    name: str
    state: str
    plugin: str | None = None
    database: str | None = None
    confirmed: str | None = None  # confirmed_flush_lsn
    active_pid: int | None = None
    wal_status: str | None = None  # reserved | extended | unreserved | lost
    reason: str | None = None  # invalidation_reason (PostgreSQL 17+), or "wal_status lost"

    @property
    def usable(self) -> bool:
        return self.state == "ok"


def slot_health(conn: psycopg.Connection, slot: str) -> SlotHealth:
    """The slot's state: missing, lost (wal_status), invalidated (invalidation_reason, 17+) or ok."""
    # to_jsonb: the columns differ by version (invalidation_reason is 17+), one query reads them all.
    row = conn.execute("select to_jsonb(s) from pg_replication_slots s where slot_name = %s", (slot,)).fetchone()
    if not conn.autocommit:
        conn.rollback()
    if row is None:
        return SlotHealth(slot, "missing")
    s = row[0]
    health = SlotHealth(slot, "ok", s.get("plugin"), s.get("database"), s.get("confirmed_flush_lsn"),
                        s.get("active_pid"), s.get("wal_status"), s.get("invalidation_reason"))
    if health.reason:
        health.state = "invalidated"
    elif health.wal_status == "lost":
        health.state, health.reason = "lost", "wal_status lost"
    return health


def slot_lost_message(health: SlotHealth, stored_lsn: str) -> str:
    """The one line `sync` and `status` give when the slot pgfresh's stored position needs is unusable."""
    what = ("is gone (dropped outside pgfresh?)" if health.state == "missing"
            else f"was invalidated ({health.reason}): the WAL it kept is removed")
    return (f"replication slot {health.name} {what}, but pgfresh stored position {stored_lsn}: changes since then "
            "were not captured; run `pgfresh resync` to re-create the slot, re-read every table and delete "
            "downstream what the source no longer has")


def ensure_slot(conn: psycopg.Connection, config: cfg.Config, stored_lsn: int = 0) -> tuple[str, bool]:
    """Create the pgoutput slot if missing. Returns (LSN to start from, created now).

    `stored_lsn`: the position pgfresh has already stored. With one, a missing or invalidated slot
    is never silently re-created (rows deleted meanwhile would stay live for ever): SlotLostError.
    """
    from pgfresh.capture.pgoutput import format_lsn
    from pgfresh.errors import SlotLostError

    slot = config.source.slot
    health = slot_health(conn, slot)
    if health.state != "missing":
        if health.plugin != "pgoutput" or health.database != conn.info.dbname:
            raise SourceError(
                f"replication slot {slot} exists for {health.plugin} on database {health.database}: "
                "choose another source.slot"
            )
        if not health.usable:
            raise SlotLostError(slot_lost_message(health, format_lsn(stored_lsn)))
        if health.active_pid:
            raise SourceError(f"replication slot {slot} is in use by process {health.active_pid}: is another pgfresh sync running?")
        return health.confirmed, False
    if stored_lsn:
        raise SlotLostError(slot_lost_message(health, format_lsn(stored_lsn)))
    return create_slot(conn, slot), True


def create_slot(conn: psycopg.Connection, slot: str) -> str:
    """Create the pgoutput slot; returns the LSN from which it streams."""
    return _autocommit(conn, "select lsn::text from pg_create_logical_replication_slot(%s, 'pgoutput')", slot)


def _autocommit(conn: psycopg.Connection, query: str, slot: str):
    # Slot functions refuse to run in a transaction that has written: run them on their own.
    was = conn.autocommit
    conn.autocommit = True
    try:
        return conn.execute(query, (slot,)).fetchone()[0]
    finally:
        conn.autocommit = was


def recreate_slot(conn: psycopg.Connection, config: cfg.Config) -> str:
    """`pgfresh resync`: drop the slot if it exists (lost, invalidated or idle) and create it anew."""
    slot = config.source.slot
    health = slot_health(conn, slot)
    if health.state != "missing":
        if health.plugin != "pgoutput" or health.database != conn.info.dbname:
            raise SourceError(f"replication slot {slot} exists for {health.plugin} on database {health.database}: "
                              "choose another source.slot")
        if health.active_pid:
            raise SourceError(f"replication slot {slot} is in use by process {health.active_pid}: "
                              "stop pgfresh sync before pgfresh resync")
        _autocommit(conn, "select pg_drop_replication_slot(%s)::text", slot)
    return create_slot(conn, slot)


def wal_keep_size_mb(conn: psycopg.Connection) -> int:
    """The server's max_slot_wal_keep_size in MB (-1: unlimited)."""
    (value,) = conn.execute("select setting::bigint from pg_settings where name = 'max_slot_wal_keep_size'").fetchone()
    if not conn.autocommit:
        conn.rollback()
    return int(value)


def check_wal_keep_size(conn: psycopg.Connection, config: cfg.Config) -> str | None:
    """Refuse a server that retains more slot WAL than source.max_slot_wal_keep_size_mb allows.

    Returns a warning when the server's bound is unlimited and pgfresh.toml asks for none.
    """
    limit = config.source.max_slot_wal_keep_size_mb
    server = wal_keep_size_mb(conn)
    if limit and (server < 0 or server > limit):
        shown = "unlimited (-1)" if server < 0 else f"{server} MB"
        raise SourceError(
            f"the server's max_slot_wal_keep_size is {shown}, but source.max_slot_wal_keep_size_mb = {limit} requires "
            f"at most {limit} MB: run ALTER SYSTEM SET max_slot_wal_keep_size = '{limit}MB'; SELECT pg_reload_conf()"
        )
    if server < 0:
        return ("max_slot_wal_keep_size is unlimited (-1): a stopped pgfresh sync lets its slot keep WAL until the "
                "primary's disk is full; set it (ALTER SYSTEM SET max_slot_wal_keep_size = '10GB') or "
                "source.max_slot_wal_keep_size_mb (docs/OPERATIONS.md)")
    return None


def list_user_tables(conn: psycopg.Connection) -> list[tuple[str, list[str], str | None]]:
    """(schema.table, primary key, guessed tenant column) of every ordinary user table."""
    rows = conn.execute(
        "select n.nspname || '.' || c.relname, c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where c.relkind in ('r','p') and not c.relispartition and n.nspname not in ('pg_catalog','information_schema','pgfresh')"
        " and n.nspname not like 'pg_toast%%' and n.nspname not like 'pg_temp%%' order by 1"
    ).fetchall()
    out = []
    for name, oid in rows:
        pk = [r[0] for r in conn.execute(
            "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)"
            " where i.indrelid = %s and i.indisprimary order by array_position(i.indkey::int2[], a.attnum)", (oid,))]
        cols = [r[0] for r in conn.execute(
            "select attname from pg_attribute where attrelid = %s and attnum > 0 and not attisdropped", (oid,))]
        tenant = next((c for c in ("tenant_id", "tenant", "org_id", "account_id", "shop_id") if c in cols), None)
        out.append((name, pk, tenant))
    return out


def _init_target(path: Path, force: bool) -> None:
    """Refuse a config path init could not write, before anything is created."""
    if path.is_dir():
        raise ConfigError(["is a directory; pass a file path (--config DIR/pgfresh.toml)"], str(path))
    if path.exists() and not force:
        raise ConfigError(["already exists; pass --force to overwrite it"], str(path))
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ConfigError([f"directory {parent} does not exist: create it first"], str(path))
    if not os.access(parent, os.W_OK):
        raise ConfigError([f"directory {parent} is not writable"], str(path))


def init_project(path: Path, dsn: str | None = None, tables: list[str] | None = None,
                 force: bool = False, warn=None, store_dsn: str | None = None) -> tuple[Path, list[str]]:
    """Write a starting pgfresh.toml from the database's tables and create schema pgfresh in the store
    (`store_dsn`, or the embedded store server in the data directory); nothing is created in the source.

    Everything is checked before anything is created: the target path, the server, each table
    (capture must be able to use it as written), the privileges, and the rendered file itself
    (config.parse), so init never writes a config that `sync` then rejects. A table that cannot be
    captured as it is (no primary key, a name that is not a plain identifier, ...) is left out with a
    comment saying why; one named in `tables` is an error instead. Returns (path, skipped tables).
    `warn(text)` receives what the operator should fix but need not (an unlimited slot WAL bound).
    """
    import tomllib

    from pgfresh import db

    path = Path(path)
    _init_target(path, force)
    probe = cfg.Config(source=cfg.SourceConfig(dsn=dsn), tables=[], path=path.resolve())
    conn = db.connect(resolve_dsn(probe), "init")
    with conn:
        check_server(conn)
        unbounded = check_wal_keep_size(conn, probe)
        if unbounded and warn is not None:
            warn(unbounded)
        found = list_user_tables(conn)
        wanted = None
        if tables:
            wanted = {t if "." in t else f"public.{t}" for t in tables}
            unknown = wanted - {f[0] for f in found}
            if unknown:
                raise SourceError(f"no such table: {', '.join(sorted(unknown))}")
            found = [f for f in found if f[0] in wanted]
        entries, skipped = [], []
        for name, pk, tenant in found:
            reason = None
            if not all(cfg._NAME.match(part) for part in name.split(".", 1)):
                reason = "its name is not a plain identifier, which pgfresh.toml cannot hold: rename it"
            else:
                try:
                    table_info(conn, cfg.TableConfig(name=name, tenant=tenant))
                except SourceError as exc:
                    reason = str(exc)
            if reason is None:
                entries.append({"name": name, "tenant": tenant})
            else:
                skipped.append(f"{name}: {reason}")
        if wanted and skipped:
            raise SourceError(f"cannot capture {'; '.join(skipped)}")
        text = cfg.render_toml({"dsn": dsn} if dsn else {"data_dir": ".pgfresh"}, entries,
                               store={"dsn": store_dsn} if store_dsn else None)
        text += "\n# The RAG index runs inside `pgfresh sync` while this section is present.\n[rag]\n"
        if skipped:
            text += "\n# Left out (add them once fixed):\n" + "".join(
                f"# - {json.dumps(s, ensure_ascii=True)}\n" for s in skipped)
        config = cfg.parse(tomllib.loads(text), path.resolve())  # never write what sync would reject
        check_privileges(conn, config)
        conn.rollback()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)  # written before the schema is created: a path that cannot be written fails first
        try:
            with db.connect_store(config, "init") as store:
                check_store(conn, store, config)
                db.migrate(store)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path, skipped
