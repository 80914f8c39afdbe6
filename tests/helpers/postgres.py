"""A real PostgreSQL server for tests: `initdb` + `pg_ctl` in a temporary folder, on a free loopback port.

Run as root (containers, CI), the server runs as an unprivileged user (`postgres` where the Debian
package made one, else `nobody`): PostgreSQL refuses to run as root. Tests skip only where the server
binaries are absent (`apt-get install postgresql`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers.servers import free_port, wait_for_port

SKIP_REASON = "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's newest /usr/lib/postgresql/*/bin, else the PATH's."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PostgresServer:
    """One throwaway cluster: trust authentication on 127.0.0.1 only, superuser `postgres`, fsync off."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.user = _server_user()
        # Not under pytest's tmp_path: its folders are private to root, and the server user must reach this one.
        self.root = Path(tempfile.mkdtemp(prefix="stemworks-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            [str(self.bindir / command[0]), *command[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> PostgresServer:
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "300", "start")
        wait_for_port(self.port)
        return self

    def create_database(self, name: str) -> str:
        """A new database; returns its libpq connection settings (what follows `ducklake:postgres:`)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.conninfo(name)

    def conninfo(self, name: str) -> str:
        return f"dbname={name} host=127.0.0.1 port={self.port} user=postgres"

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
