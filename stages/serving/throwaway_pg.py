"""A throwaway PostgreSQL server for the tests and the serving benchmark: `initdb` and `pg_ctl` (Debian's
`postgresql` package) on a Unix socket in a temporary folder, no TCP port, removed when stopped. As root it runs
as the `postgres` user, since initdb refuses root. Writes only that folder."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional


class Unavailable(RuntimeError):
    """No server could be started here; the message says why (for a test's skip reason)."""


def binaries() -> Optional[Path]:
    """The folder holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


class ThrowawayPostgres:
    """`with ThrowawayPostgres() as pg:` a running server; `pg.url(database)` a URL for psycopg and `serve
    --ledger`; `stop()` and `start()` take it down and up again with its data (a database that goes away)."""

    def __init__(self, fsync: bool = True):
        self.bin = binaries()
        if self.bin is None:
            raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and no `postgres` user to run initdb as") from None
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.folder = Path(tempfile.mkdtemp(prefix="ini-pg-"))
        if self.as_user:
            shutil.chown(self.folder, "postgres")
        self.data, self.log = self.folder / "data", self.folder / "log"
        self.fsync = fsync
        result = self._run(
            "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"
        )
        if result.returncode != 0:
            self._remove()
            raise Unavailable(f"initdb failed: {_last_line(result)}")

    def _run(self, tool: str, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bin / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> "ThrowawayPostgres":
        options = f"-k {self.folder} -c listen_addresses='' -c fsync={'on' if self.fsync else 'off'}"
        result = self._run("pg_ctl", "-D", self.data, "-o", options, "-l", self.log, "-w", "-t", "60", "start")
        if result.returncode != 0:
            tail = self.log.read_text().strip().splitlines()[-1:] if self.log.exists() else []
            raise Unavailable(f"pg_ctl start failed: {_last_line(result)} {' '.join(tail)}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.folder}"

    def create(self, database: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{database}"')
        return self.url(database)

    def _remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "ThrowawayPostgres":
        try:
            return self.start()
        except BaseException:
            self._remove()
            raise

    def __exit__(self, *_) -> None:
        self.stop("immediate")
        self._remove()


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"
