"""Preparing a source database for capture, and refusing clearly when it cannot be used.

`check_source` verifies, before anything is created, everything capture needs: `wal_level=logical`,
a role allowed to replicate, every configured table present with a usable key. Each failure is one
line saying what is wrong and how to fix it. `ensure_publication` / `ensure_slot` then create the
publication (exactly the configured tables, never schema pgfresh: tables added to or removed from
the config are added to or dropped from it) and the pgoutput slot; `slot_health` tells a usable
slot from a missing, lost or invalidated one, and `ensure_slot` refuses to re-create one silently
while pgfresh holds a stored position. `check_wal_keep_size` holds the server to
`source.max_slot_wal_keep_size_mb`.
`init_project` writes a starting pgfresh.toml from the database's tables.
"""

from __future__ import annotations

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

    @property
    def ident(self) -> sql.Composed:
        schema, table = self.name.split(".", 1)
        return sql.Identifier(schema, table)


def resolve_dsn(config: cfg.Config) -> str:
    """The source DSN: the configured one, or the embedded server (started if needed)."""
    if config.source.dsn:
        return config.source.dsn
    from pgfresh.embedded import EmbeddedServer

    return EmbeddedServer(config.data_dir / "pg").start()


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
            f"role {user} may not replicate: run ALTER ROLE {user} WITH REPLICATION (and grant SELECT on the tables)"
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
            f"and run ALTER TABLE {table.name} REPLICA IDENTITY FULL"
        )
    if table.key and table.key != pk and replident != "f":
        raise SourceError(
            f"table {table.name}: key {table.key} is not its primary key, so deletes would not carry it: "
            f"run ALTER TABLE {table.name} REPLICA IDENTITY FULL"
        )
    if replident == "n":
        raise SourceError(
            f"table {table.name} has REPLICA IDENTITY NOTHING, so updates and deletes carry no key: "
            f"run ALTER TABLE {table.name} REPLICA IDENTITY DEFAULT"
        )
    missing = [c for c in key + ([table.tenant] if table.tenant else []) if c not in names]
    if missing:
        raise SourceError(f"table {table.name} has no column {', '.join(missing)}: fix key/tenant in pgfresh.toml")
    return TableInfo(table.name, names, [c[1] for c in cols], [c[2] for c in cols], key, table.tenant)


def check_source(conn: psycopg.Connection, config: cfg.Config) -> dict[str, TableInfo]:
    """Everything capture needs, checked before anything is created."""
    check_server(conn)
    if not config.tables:
        raise ConfigError(["tables: no [[tables]] configured; run `pgfresh init` or add one"], str(config.path))
    infos = {t.name: table_info(conn, t) for t in config.tables}
    conn.rollback()
    return infos


def ensure_publication(conn: psycopg.Connection, config: cfg.Config) -> tuple[list[str], list[str]]:
    """Make the publication hold exactly the configured tables. Returns (tables added, tables removed).

    A table removed from pgfresh.toml leaves the publication, so its changes stop arriving (the
    few already in the WAL before this are dropped by the row store, with a count).
    """
    pub = config.source.publication
    with conn.transaction():
        exists = conn.execute("select 1 from pg_publication where pubname = %s", (pub,)).fetchone()
        names = [sql.Identifier(t.schema, t.table) for t in config.tables]
        if not exists:
            conn.execute(sql.SQL("create publication {} for table {}").format(sql.Identifier(pub), sql.SQL(", ").join(names)))
            return [t.name for t in config.tables], []
        have = {f"{s}.{t}": (s, t) for s, t in conn.execute(
            "select schemaname, tablename from pg_publication_tables where pubname = %s", (pub,))}
        added = [t for t in config.tables if t.name not in have]
        removed = sorted(set(have) - {t.name for t in config.tables})
        for t in added:
            conn.execute(sql.SQL("alter publication {} add table {}").format(
                sql.Identifier(pub), sql.Identifier(t.schema, t.table)))
        for name in removed:
            conn.execute(sql.SQL("alter publication {} drop table {}").format(
                sql.Identifier(pub), sql.Identifier(*have[name])))
    return [t.name for t in added], removed


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


def init_project(path: Path, dsn: str | None = None, tables: list[str] | None = None, force: bool = False,
                 warn=None) -> Path:
    """Write a starting pgfresh.toml from the database's tables and create schema pgfresh.

    `warn(text)` receives what the operator should fix but need not (an unlimited slot WAL bound).
    """
    from pgfresh import db

    path = Path(path)
    if path.exists() and not force:
        raise ConfigError(["already exists; pass --force to overwrite it"], str(path))
    probe = cfg.Config(source=cfg.SourceConfig(dsn=dsn), tables=[], path=path.resolve())
    conn = db.connect(resolve_dsn(probe), "init")
    with conn:
        check_server(conn)
        unbounded = check_wal_keep_size(conn, probe)
        if unbounded and warn is not None:
            warn(unbounded)
        found = list_user_tables(conn)
        if tables:
            wanted = {t if "." in t else f"public.{t}" for t in tables}
            unknown = wanted - {f[0] for f in found}
            if unknown:
                raise SourceError(f"no such table: {', '.join(sorted(unknown))}")
            found = [f for f in found if f[0] in wanted]
        entries = []
        for name, pk, tenant in found:
            entries.append({"name": name, "key": None if pk else ["id"], "tenant": tenant})
        conn.rollback()
        db.migrate(conn)
    source = {"dsn": dsn}
    if not dsn:
        source["data_dir"] = ".pgfresh"
    path.write_text(cfg.render_toml(source, entries) + "\n# The RAG index runs inside `pgfresh sync` while this section is present.\n[rag]\n")
    return path
