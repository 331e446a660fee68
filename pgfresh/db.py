"""Connections to the source database and to the store, where pgfresh keeps schema `pgfresh`.

The source gets only what logical replication needs (a publication, a slot, short snapshot reads);
every table, function and row pgfresh keeps lives in the store (`store_dsn`): `[store] dsn`, or by
default an embedded server of its own in `<data_dir>/store`. `migrate` runs on the store only.

Every connection carries `application_name` (`pgfresh-capture`, `pgfresh-index`, ...) so a DBA
sees in `pg_stat_activity` who holds what, and where the server supports it (PostgreSQL 17+)
`transaction_timeout`, so no transaction pgfresh opens can outlive `max_txn_seconds`, whatever
goes wrong in pgfresh itself.

`migrate` applies the numbered SQL files in `pgfresh/migrations/` in order, once each, under an
advisory lock; a released migration is never edited. A migration whose first lines say
`-- requires extension: NAME` is deferred while the server cannot install NAME (e.g. pgvector on
a server without it), so capture works there; the stage that needs it reports the missing
extension when it runs.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg
from psycopg import errors as pgerr

from pgfresh.errors import ConnectionLostError, SourceError

MIGRATION_LOCK = 0x70676672  # "pgfr": advisory lock key for migrations


def connect(dsn: str, role: str, *, max_txn_seconds: float | None = None, autocommit: bool = False,
            connect_timeout: int = 10, database: str = "source") -> psycopg.Connection:
    """Open a connection named `pgfresh-<role>`; translate connection failures into one clear line."""
    options = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=1"
    try:
        conn = psycopg.connect(dsn, application_name=f"pgfresh-{role}", options=options,
                               autocommit=autocommit, connect_timeout=connect_timeout)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Refused, unreachable or still starting up: `sync` retries these after it lost a connection.
        lost = exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate == "57P03"
        raise (ConnectionLostError if lost else SourceError)(
            f"cannot connect to the {database} database ({first}); check {database}.dsn in pgfresh.toml") from None
    if max_txn_seconds and conn.info.server_version >= 170000:
        ms = int(max_txn_seconds * 1000)
        conn.execute(f"set transaction_timeout = {ms}")  # an int we computed, not user text
        if not autocommit:
            conn.commit()
    return conn


def store_dsn(config) -> str:
    """The DSN of pgfresh's store: `[store] dsn`, or the embedded server in `<data_dir>/store`
    (started if needed; a server of its own, beside the source's embedded one in `<data_dir>/pg`).
    Every read and write of schema pgfresh connects here."""
    if config.store.dsn:
        return config.store.dsn
    from pgfresh.embedded import EmbeddedServer

    return EmbeddedServer(config.data_dir / "store").start()


def connect_store(config, role: str, **kwargs) -> psycopg.Connection:
    """A connection to the store (`store_dsn`), named `pgfresh-<role>`."""
    return connect(store_dsn(config), role, database="store", **kwargs)


def migrate(conn: psycopg.Connection) -> list[str]:
    """Create schema pgfresh and apply pending migrations; return the names applied."""
    applied_now = []
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("create schema if not exists pgfresh")
        conn.execute(
            "create table if not exists pgfresh.migrations ("
            " version integer primary key, name text not null, applied_at timestamptz not null default now())"
        )
        done = {r[0] for r in conn.execute("select version from pgfresh.migrations")}
        files = sorted(
            (f for f in resources.files("pgfresh.migrations").iterdir() if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        available = {r[0] for r in conn.execute("select name from pg_available_extensions")}
        for f in files:
            version = int(f.name.split("_", 1)[0])
            if version in done:
                continue
            text = f.read_text()
            needs = set(re.findall(r"^-- requires extension: (\w+)", text, re.M))
            if needs - available:
                continue
            try:
                conn.execute(text)
            except pgerr.UndefinedFile as exc:
                raise SourceError(f"migration {f.name} needs an extension the server lacks: {exc}") from None
            conn.execute("insert into pgfresh.migrations (version, name) values (%s, %s)", (version, f.name))
            applied_now.append(f.name)
    return applied_now

