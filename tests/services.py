"""Real services for tests: a throwaway PostgreSQL server and an ``mlflow server``.

Both are context managers that stop what they started and remove what they wrote, also when
the body fails. They raise :class:`Unavailable` (a reason to skip) when a binary is missing.

PostgreSQL refuses to run as root: as root, the server runs as an unprivileged OS user
(``lcscpg``, created if missing) that owns its data and socket folders. Local and TCP
connections of that superuser need no password; any other role logs in over TCP with its
password (scram-sha-256), so a wrong password is refused.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

PG_BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")
PG_OS_USER = "lcscpg"


class Unavailable(RuntimeError):
    """A service cannot be started here (a binary or package is missing): skip, do not fail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next((str(Path(d) / name) for d in PG_BIN_DIRS if (Path(d) / name).is_file()), None)
    if found is None:
        raise Unavailable(f"PostgreSQL's {name} is not installed (looked on PATH and in {', '.join(PG_BIN_DIRS)})")
    return found


def _os_user() -> str | None:
    """The unprivileged OS user that runs postgres when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            raise Unavailable("running as root without useradd: cannot create an OS user for postgres") from None
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
                       check=True, capture_output=True)
    return PG_OS_USER


def _as(user: str | None, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


@dataclass
class Postgres:
    """A running PostgreSQL server on 127.0.0.1; ``url`` is its first, empty database."""

    port: int
    superuser: str
    url: str = ""
    databases: list[str] = field(default_factory=list)

    def dsn(self, database: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        auth = user or self.superuser
        if password is not None:
            auth += f":{password}"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Run SQL as the superuser, in autocommit (CREATE DATABASE refuses a transaction)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname=database,
                             autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql)

    def new_database(self, name: str, owner: str | None = None) -> str:
        """A new, empty database (owned by ``owner``, else the superuser); returns its SQLAlchemy
        URL for the superuser (psycopg v3 driver)."""
        self.execute(f'CREATE DATABASE "{name}"' + (f' OWNER "{owner}"' if owner else ""))
        self.databases.append(name)
        return self.dsn(name)

    def create_user(self, name: str, password: str) -> None:
        """A login role that must give ``password`` (scram-sha-256 over TCP)."""
        self.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")

    def query(self, sql: str, database: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname=database) as conn:
            return conn.execute(sql).fetchall()

    def tables(self, database: str) -> list[str]:
        return sorted(r[0] for r in self.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database))


HBA = """\
local all all trust
host all {superuser} 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


@contextlib.contextmanager
def postgres_server(tmp_dir: Path, database: str = "lcsc") -> Iterator[Postgres]:
    """initdb + pg_ctl start on 127.0.0.1 and a free port; yields a :class:`Postgres` whose ``url``
    (``postgresql+psycopg://lcscpg@127.0.0.1:<port>/<database>``) is an empty database.

    The data folder lives in a fresh folder of the system temp dir (``tmp_dir``, pytest's, is not
    traversable by another OS user); the server log is copied to ``tmp_dir``. At the end the
    server is stopped and the data folder removed, also on failure."""
    try:
        import psycopg  # noqa: F401  (the tests and the product need psycopg v3)
    except ImportError:
        raise Unavailable("psycopg (v3) is not installed: pip install 'lcsc-ops[postgres]'") from None
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    _pg_binary("postgres")
    user = _os_user()
    superuser = user or pwd.getpwuid(os.geteuid()).pw_name
    root = Path(tempfile.mkdtemp(prefix="lcsc-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    started = False
    try:
        sockets.mkdir()
        if user is not None:
            shutil.chown(root, user)
            shutil.chown(sockets, user)
        _as(user, [initdb, "-D", str(data), "-U", superuser, "--auth=trust", "-E", "UTF8", "--no-sync"])
        (data / "pg_hba.conf").write_text(HBA.format(superuser=superuser))
        port = free_port()
        settings = (f"-h 127.0.0.1 -p {port} -k {sockets} -c max_connections=200 -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off")
        _as(user, [pg_ctl, "start", "-w", "-t", "60", "-D", str(data), "-l", str(log), "-o", settings])
        started = True
        server = Postgres(port=port, superuser=superuser)
        server.url = server.new_database(database)
        yield server
    finally:
        if started:
            with contextlib.suppress(RuntimeError):
                _as(user, [pg_ctl, "stop", "-w", "-t", "60", "-m", "fast", "-D", str(data)])
        if log.is_file():
            with contextlib.suppress(OSError):
                shutil.copy(log, Path(tmp_dir) / "postgres.log")
        shutil.rmtree(root, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(tmp_dir: Path, backend_uri: str, *, timeout: float = 180.0, workers: int = 2) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 and a free port, on ``backend_uri``, serving (proxying)
    artifacts from ``<tmp_dir>/artifacts``; yields ``http://127.0.0.1:<port>`` once ``/health``
    answers. At the end SIGTERM (then SIGKILL) goes to its process group: it and its children."""
    tmp_dir = Path(tmp_dir)
    port = free_port()
    log_path = tmp_dir / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
           "--port", str(port), "--artifacts-destination", str(tmp_dir / "artifacts"), "--workers", str(workers),
           "--uvicorn-opts", "--timeout-graceful-shutdown 3"]  # do not wait on clients' keep-alive connections
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_dir, start_new_session=True)
    huey = None
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server: no /health after {timeout:.0f} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        huey = _group_env(proc.pid, "_MLFLOW_HUEY_STORAGE_PATH")
        yield url
    finally:
        _stop_group(proc)
        if huey and Path(huey).parent == Path("/dev/shm"):
            shutil.rmtree(huey, ignore_errors=True)  # the server's job-queue folder, which it leaves behind


def _group_env(pgid: int, name: str) -> str | None:
    """The value of environment variable ``name`` in a process of group ``pgid`` (None: none has it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for var in (stat.parent / "environ").read_bytes().split(b"\0"):
                if var.startswith(name.encode() + b"="):
                    return var.split(b"=", 1)[1].decode()
    return None


def _stop_group(proc: subprocess.Popen, wait: float = 20.0) -> None:
    """SIGTERM the process group ``proc`` leads (we started it with its own session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            deadline = time.monotonic() + wait
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _group_alive(proc.pid):
                return
        except subprocess.TimeoutExpired:
            pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for init to reap them do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False
