"""API keys of the HTTP API: each bound to one tenant or to admin; only a SHA-256 of a key is stored.

A key is `pgf_` + 32 random bytes (URL-safe base64), so an unsalted SHA-256 is enough to look it up
without storing it (there is nothing to brute-force). `create` returns the key once; `revoke` marks
it revoked (the row stays, for the audit trail). `verify` is what the server calls per request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from pgfresh import db
from pgfresh.errors import PgfreshError


class ApiKeyError(PgfreshError):
    """An API key command was asked for something that cannot be done (unknown key id, bad binding)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: one tenant (None: the rows without a tenant), or admin (any tenant)."""

    key_id: int | None
    tenant: str | None
    admin: bool


LOCAL = Principal(None, None, True)  # no keys configured: the server listens on localhost only


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _connect(config):
    conn = db.connect(db.store_dsn(config), "keys", autocommit=True)
    db.migrate(conn)
    return conn


def create(config, tenant: str | None = None, admin: bool = False, name: str = "") -> dict:
    """A new key for `tenant` (or admin); the only time the key itself is shown."""
    if admin and tenant is not None:
        raise ApiKeyError("a key is bound to one tenant or is admin, not both: drop --tenant or --admin")
    key = "pgf_" + secrets.token_urlsafe(32)
    with _connect(config) as conn:
        row = conn.execute("insert into pgfresh.api_keys (name, tenant, admin, key_hash, prefix) values (%s, %s, %s, %s, %s)"
                           " returning id, created_at", (name, tenant, admin, digest(key), key[:8])).fetchone()
    return {"id": row[0], "key": key, "tenant": tenant, "admin": admin, "name": name, "created_at": row[1]}


def list_keys(config) -> list[dict]:
    with _connect(config) as conn:
        rows = conn.execute("select id, name, tenant, admin, prefix, created_at, revoked_at, last_used_at"
                            " from pgfresh.api_keys order by id").fetchall()
    cols = ("id", "name", "tenant", "admin", "prefix", "created_at", "revoked_at", "last_used_at")
    return [dict(zip(cols, r)) for r in rows]


def revoke(config, key_id: int) -> dict:
    with _connect(config) as conn:
        row = conn.execute("update pgfresh.api_keys set revoked_at = coalesce(revoked_at, now()) where id = %s"
                           " returning id, tenant, admin, revoked_at", (key_id,)).fetchone()
    if row is None:
        raise ApiKeyError(f"no API key with id {key_id}; `pgfresh keys list` shows them")
    return {"id": row[0], "tenant": row[1], "admin": row[2], "revoked_at": row[3]}


def any_configured(conn) -> bool:
    """Whether any key exists (revoked ones included: revoking every key must not open the server)."""
    return conn.execute("select exists (select 1 from pgfresh.api_keys)").fetchone()[0]


def verify(conn, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None otherwise."""
    row = conn.execute("update pgfresh.api_keys set last_used_at = now() where key_hash = %s and revoked_at is null"
                       " returning id, tenant, admin", (digest(key),)).fetchone()
    return Principal(row[0], row[1], row[2]) if row else None
