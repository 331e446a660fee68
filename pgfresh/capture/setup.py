"""Preparing a source database for capture, and refusing clearly when it cannot be used.

`check_source` verifies, before anything is created, everything capture needs: `wal_level=logical`,
a role allowed to replicate, every configured table present with a usable (unique) key, and every
privilege the role needs today (docs/PRIVILEGES.md). Each failure is one line saying what is wrong
and how to fix it. `ensure_publication` / `ensure_slot` then create the
publication (only the configured tables, never schema pgfresh) and the pgoutput slot.
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
                f"so two rows could share it: set key to unique columns, or CREATE UNIQUE INDEX ON {table.name} ({cols})"
            )
    return TableInfo(table.name, names, [c[1] for c in cols], [c[2] for c in cols], key, table.tenant)


def check_source(conn: psycopg.Connection, config: cfg.Config) -> dict[str, TableInfo]:
    """Everything capture needs, checked before anything is created."""
    check_server(conn)
    if not config.tables:
        raise ConfigError(["tables: no [[tables]] configured; run `pgfresh init` or add one"], str(config.path))
    infos = {t.name: table_info(conn, t) for t in config.tables}
    check_privileges(conn, config)
    conn.rollback()
    return infos


def _ident(conn, *names: str) -> str:
    return sql.Identifier(*names).as_string(conn)


def missing_privileges(conn: psycopg.Connection, config: cfg.Config) -> list[str]:
    """Each privilege the current role lacks for what pgfresh does today, as 'what (why): the GRANT that fixes it'.

    Today pgfresh keeps its own schema in the source, so beyond REPLICATION (check_server) and SELECT
    on the tables it needs: CREATE on the database (schema pgfresh, and the publication unless it
    exists), extension vector installed by a superuser (it is not a trusted extension), and, to
    create or change the publication, ownership of it and of the tables it adds. docs/PRIVILEGES.md.
    """
    user, dbname = conn.info.user, conn.info.dbname
    role, database = _ident(conn, user), _ident(conn, dbname)
    if conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]:
        return []
    missing: list[str] = []
    can_create_in_db = conn.execute("select has_database_privilege(current_database(), 'CREATE')").fetchone()[0]
    schema = conn.execute("select has_schema_privilege(oid, 'USAGE'), has_schema_privilege(oid, 'CREATE')"
                          " from pg_namespace where nspname = 'pgfresh'").fetchone()
    pub = config.source.publication
    pub_row = conn.execute("select pg_has_role(pubowner, 'USAGE') from pg_publication where pubname = %s",
                           (pub,)).fetchone()
    need_db_create = []
    if schema is None:
        need_db_create.append("to create schema pgfresh")
    elif not all(schema):
        missing.append(f"USAGE and CREATE on schema pgfresh: GRANT USAGE, CREATE ON SCHEMA pgfresh TO {role}")
    if pub_row is None:
        need_db_create.append(f"to create publication {pub}")
    if need_db_create and not can_create_in_db:
        missing.append(f"CREATE on database {dbname} ({' and '.join(need_db_create)}): "
                       f"GRANT CREATE ON DATABASE {database} TO {role}")
    vector = conn.execute("select exists (select 1 from pg_available_extensions where name = 'vector'),"
                          " exists (select 1 from pg_extension where extname = 'vector')").fetchone()
    if vector[0] and not vector[1]:
        missing.append(f"extension vector in database {dbname} (only a superuser may create it): CREATE EXTENSION vector")
    in_pub = set() if pub_row is None else {f"{s}.{t}" for s, t in conn.execute(
        "select schemaname, tablename from pg_publication_tables where pubname = %s", (pub,))}
    configured = {t.name for t in config.tables}
    if pub_row is not None and not pub_row[0] and in_pub != configured:
        missing.append(f"ownership of publication {pub} (to make it match the configured tables): "
                       f"ALTER PUBLICATION {_ident(conn, pub)} OWNER TO {role}, or have its owner make it match")
    for t in config.tables:
        select_ok, owner_ok = conn.execute(
            "select has_table_privilege(c.oid, 'SELECT'), pg_has_role(c.relowner, 'USAGE') from pg_class c"
            " join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s",
            (t.schema, t.table)).fetchone()
        if not select_ok:
            missing.append(f"SELECT on {t.name}: GRANT SELECT ON {_ident(conn, t.schema, t.table)} TO {role}")
        if t.name not in in_pub and not owner_ok:
            missing.append(f"ownership of {t.name} (to add it to publication {pub}): have its owner run "
                           + (f"CREATE PUBLICATION {_ident(conn, pub)} FOR TABLE ..." if pub_row is None else
                              f"ALTER PUBLICATION {_ident(conn, pub)} ADD TABLE {_ident(conn, t.schema, t.table)}"))
    return missing


def check_privileges(conn: psycopg.Connection, config: cfg.Config) -> None:
    """SourceError naming every privilege the role lacks, in one line, before anything is created."""
    missing = missing_privileges(conn, config)
    if missing:
        raise SourceError(f"role {conn.info.user} lacks what pgfresh needs: {'; '.join(missing)} "
                          "(an administrator can run pgfresh/examples/grant.sql; see docs/PRIVILEGES.md)")


def ensure_publication(conn: psycopg.Connection, config: cfg.Config) -> None:
    """Create the publication on exactly the configured tables, or add tables missing from it."""
    pub = config.source.publication
    with conn.transaction():
        exists = conn.execute("select 1 from pg_publication where pubname = %s", (pub,)).fetchone()
        names = [sql.Identifier(t.schema, t.table) for t in config.tables]
        if not exists:
            conn.execute(sql.SQL("create publication {} for table {}").format(sql.Identifier(pub), sql.SQL(", ").join(names)))
            return
        have = {f"{s}.{t}" for s, t in conn.execute(
            "select schemaname, tablename from pg_publication_tables where pubname = %s", (pub,))}
        for t in config.tables:
            if t.name not in have:
                conn.execute(sql.SQL("alter publication {} add table {}").format(
                    sql.Identifier(pub), sql.Identifier(t.schema, t.table)))


def ensure_slot(conn: psycopg.Connection, config: cfg.Config) -> tuple[str, bool]:
    """Create the pgoutput slot if missing. Returns (LSN to start from, created now)."""
    slot = config.source.slot
    row = conn.execute(
        "select plugin, database, confirmed_flush_lsn::text, active_pid from pg_replication_slots where slot_name = %s",
        (slot,),
    ).fetchone()
    conn.rollback()
    if row is not None:
        plugin, database, confirmed, active_pid = row
        if plugin != "pgoutput" or database != conn.info.dbname:
            raise SourceError(
                f"replication slot {slot} exists for {plugin} on database {database}: choose another source.slot"
            )
        if active_pid:
            raise SourceError(f"replication slot {slot} is in use by process {active_pid}: is another pgfresh sync running?")
        return confirmed, False
    was = conn.autocommit
    conn.autocommit = True
    try:
        (lsn,) = conn.execute("select lsn::text from pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)).fetchone()
    finally:
        conn.autocommit = was
    return lsn, True


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
                 force: bool = False) -> tuple[Path, list[str]]:
    """Write a starting pgfresh.toml from the database's tables and create schema pgfresh.

    Everything is checked before anything is created: the target path, the server, each table
    (capture must be able to use it as written), the privileges, and the rendered file itself
    (config.parse), so init never writes a config that `sync` then rejects. A table that cannot be
    captured as it is (no primary key, a name that is not a plain identifier, ...) is left out with a
    comment saying why; one named in `tables` is an error instead. Returns (path, skipped tables).
    """
    import tomllib

    from pgfresh import db

    path = Path(path)
    _init_target(path, force)
    probe = cfg.Config(source=cfg.SourceConfig(dsn=dsn), tables=[], path=path.resolve())
    conn = db.connect(resolve_dsn(probe), "init")
    with conn:
        check_server(conn)
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
        text = cfg.render_toml({"dsn": dsn} if dsn else {"data_dir": ".pgfresh"}, entries)
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
            db.migrate(conn)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path, skipped
