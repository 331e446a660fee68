"""Test fixtures: one real embedded PostgreSQL per test session, a fresh database per test.

No mocks of the database or of the replication stream: every test talks to PostgreSQL 18 with
wal_level=logical, exactly as `pgfresh` does in production.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgfresh.embedded import EmbeddedServer  # noqa: E402


# `make test` runs two pytest-xdist workers: each test file runs whole on one worker (its module
# fixtures are set up once), and files that share a model build run on the same worker, one after
# the other, so the second copies the first's build from the cache. (`--dist loadgroup` would say
# this with marks, but it does not group under pytest 9: measured, every test spread out.)
SAME_WORKER = {"test_train.py": "test_model.py", "test_arena_tuned.py": "test_arena.py"}


if importlib.util.find_spec("xdist"):  # a test dependency; pytest refuses the hook without the plugin
    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadFileScheduling

        class SharedBuilds(LoadFileScheduling):
            def _split_scope(self, nodeid: str) -> str:
                name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
                return SAME_WORKER.get(name, name)

        return SharedBuilds(config, log)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    # A tiny logical_decoding_work_mem makes the server stream any transaction over 64 kB while it
    # runs (pgoutput protocol 2), so every test also exercises the streamed-transaction path.
    server = EmbeddedServer(tmp_path_factory.mktemp("pg") / "data", settings={"logical_decoding_work_mem": "'64kB'"})
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session", autouse=True)
def _stop_stray_servers(tmp_path_factory):
    """Stop, at the end of the session, the servers that `pgfresh` commands run by tests started.

    A default store is an embedded server that `pgfresh` starts on demand and leaves running for the
    next command, as a user wants; a test run must not leave dozens of them behind.
    """
    yield
    for pid_file in tmp_path_factory.getbasetemp().glob("**/postmaster.pid"):
        EmbeddedServer(pid_file.parent).stop("immediate")


@pytest.fixture
def dsn(pg_server):
    """DSN of a new, empty database on the session server; dropped (with its slots) afterwards."""
    yield from _database(pg_server)


@pytest.fixture
def dsn2(pg_server):
    """DSN of one more new, empty database on the session server (a second source); dropped afterwards."""
    yield from _database(pg_server)


@pytest.fixture(scope="module")
def module_dsn(pg_server):
    """DSN of a new, empty database for a module-scoped fixture (an arena run several tests read);
    dropped with its slots after the module."""
    yield from _database(pg_server)


def _database(pg_server):
    name = "t_" + uuid.uuid4().hex[:12]
    admin = pg_server.dsn()
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'create database "{name}"')
    yield pg_server.dsn(name)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
            (name,),
        )
        for (slot,) in c.execute("select slot_name from pg_replication_slots where database = %s", (name,)).fetchall():
            c.execute("select pg_drop_replication_slot(%s)", (slot,))
        c.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def db(dsn):
    """An autocommit psycopg connection to the test database, for setting up and checking the source."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def store_dsn(pg_server, dsn):
    """DSN of a second new database on the session server, `<test database>_store`, for pgfresh's state."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"] + "_store"
    admin = pg_server.dsn()
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'create database "{name}"')
    yield pg_server.dsn(name)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def store(store_dsn):
    """An autocommit connection to the store database, for checking what pgfresh keeps."""
    with psycopg.connect(store_dsn, autocommit=True) as conn:
        yield conn


def write_config(directory: Path, dsn: str, body: str = "", store: str | None = None) -> Path:
    """Write pgfresh.toml for `dsn` (plus extra TOML) into `directory` and return its path.

    `store`: the store's DSN (fixture `store_dsn`: a database of its own). Without it the store is
    the source database itself (`[store] dsn` = the source's), which most tests use to read
    pgfresh's tables through the `db` fixture; tests of the separation pass a store of their own.
    """
    path = directory / "pgfresh.toml"
    # The store as a root-level inline table: it comes first, so a body may append to any section.
    path.write_text(f'store = {{ dsn = "{store or dsn}" }}\n[source]\ndsn = "{dsn}"\nmax_txn_seconds = 5\n' + body)
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run `pgfresh ARGS` as a real process; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pgfresh", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)

