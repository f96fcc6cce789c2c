"""A throwaway PostgreSQL 15 cluster on 127.0.0.1 for tests.

``postgres_server(tmp_dir)`` runs ``initdb`` and ``pg_ctl start`` in a fresh directory and yields a
SQLAlchemy URL ``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres`` (a ``PostgresUrl``, a
``str`` that also carries the postmaster's ``pid``, ``port`` and ``data_dir``). On exit it stops
the postmaster by its pid (SIGINT, a fast shutdown; SIGKILL after a timeout) and removes the
directory, keeping the server log as ``tmp_dir / "postgres.log"``.

Root may not run ``initdb``, so as root the binaries run as the ``postgres`` OS user (through
``runuser``) in a directory under the system temporary directory that this user owns; pytest's own
``tmp_path`` (``/tmp/pytest-of-root``, mode 0700) is not reachable by that user, and unix socket
paths are limited to about 100 bytes. Otherwise they run as the current user.

Fixtures, to import into a conftest or a test module::

    from tests.support.postgres import postgres_db_url, postgres_url  # noqa: F401

``postgres_url`` is session-scoped (one cluster per test session); ``postgres_db_url`` gives each
test a new empty database in that cluster. ``make_postgres_fixture(scope=...)`` builds the
server fixture for another scope.

libpq, not Python's ``socket``, opens psycopg's connections, so pytest-recording's
``--block-network`` (which patches ``socket.socket.connect``) does not stop them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.servers import REQUIRE_SERVERS, find_binary, free_port

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)
INSTALL_HINT = "apt-get install -y postgresql"
OS_USER = "postgres"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 3


class PostgresUrl(str):
    """A SQLAlchemy URL of a running test server, with the server's pid, port and data dir."""

    pid: int
    port: int
    data_dir: Path

    def __new__(cls, url: str, *, pid: int, port: int, data_dir: Path) -> PostgresUrl:
        self = super().__new__(cls, url)
        self.pid = pid
        self.port = port
        self.data_dir = data_dir
        return self


def _skip_or_fail(message: str) -> None:
    if REQUIRE_SERVERS:
        pytest.fail(message)
    pytest.skip(message)


def _run_as() -> list[str]:
    """Return the command prefix that runs a program as the cluster's owner."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        _skip_or_fail("runuser is not installed; root needs it to run initdb as 'postgres'")
    try:
        import pwd

        pwd.getpwnam(OS_USER)
    except KeyError:
        _skip_or_fail(f"there is no {OS_USER!r} OS user; install it with: {INSTALL_HINT}")
    return [str(runuser), "-u", OS_USER, "--"]


def _chown_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user=OS_USER, group=None)


def pid_alive(pid: int) -> bool:
    """Return whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state follows the parenthesised command name, which may itself contain ')'.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a postmaster by pid: SIGINT (fast shutdown), then SIGKILL after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5.0
            while pid_alive(pid) and time.monotonic() < kill_deadline:
                time.sleep(0.02)
            return
        time.sleep(0.02)


def _read_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.strip().isdigit() else None


def _wait_for_connection(port: int, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
            ) as conn:
                conn.execute("select 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def postgres_server(tmp_dir: Path) -> Iterator[str]:
    """Start a throwaway PostgreSQL cluster on 127.0.0.1 and yield its SQLAlchemy URL.

    The yielded value is a ``PostgresUrl`` (a ``str``) whose ``pid`` is the postmaster's pid.
    Skips (fails under ``KIKI_REQUIRE_SERVERS=1``) when PostgreSQL or psycopg is missing.
    """
    initdb = find_binary("initdb", INSTALL_HINT, extra_dirs=PG_BIN_DIRS)
    pg_ctl = find_binary("pg_ctl", INSTALL_HINT, extra_dirs=PG_BIN_DIRS)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _skip_or_fail("psycopg is not installed; install it with: pip install 'psycopg[binary]'")
    prefix = _run_as()

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kiki-pg-"))
    data_dir, sock_dir, log = work / "data", work / "sock", work / "postgres.log"
    pid: int | None = None
    try:
        sock_dir.mkdir()
        for path in (work, sock_dir):
            _chown_to_owner(path)
        run = {"cwd": work, "capture_output": True, "text": True, "check": False}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}
        done = subprocess.run(
            [*prefix, initdb, "-D", str(data_dir), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            env=env, **run,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")

        for attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            options = (
                f"-p {port} -k {sock_dir} -c listen_addresses=127.0.0.1"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            done = subprocess.run(
                [*prefix, pg_ctl, "-D", str(data_dir), "-l", str(log), "-o", options,
                 "-w", "-t", str(int(START_TIMEOUT)), "start"],
                env=env, **run,
            )  # fmt: skip
            pid = _read_pid(data_dir)
            if done.returncode == 0 and pid is not None:
                break
            if pid is not None:
                stop_pid(pid)
                pid = None
            log_text = log.read_text(errors="replace") if log.exists() else ""
            if "could not bind" in log_text and attempt + 1 < _PORT_ATTEMPTS:
                continue
            raise RuntimeError(
                f"pg_ctl start failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{log_text}"
            )

        _wait_for_connection(port, START_TIMEOUT)
        yield PostgresUrl(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
            pid=pid,
            port=port,
            data_dir=data_dir,
        )
    finally:
        if pid is not None:
            stop_pid(pid)
        with contextlib.suppress(OSError):
            if log.exists():
                shutil.copyfile(log, tmp_dir / "postgres.log")
        shutil.rmtree(work, ignore_errors=True)


def create_database(url: str, name: str | None = None) -> str:
    """Create a new empty database on the server of ``url`` and return its SQLAlchemy URL."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = name or f"test_{uuid.uuid4().hex[:12]}"
    parsed = make_url(url)
    with psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username,
        dbname=parsed.database, autocommit=True,
    ) as conn:  # fmt: skip
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return parsed.set(database=name).render_as_string(hide_password=False)


def make_postgres_fixture(scope: str = "session") -> Callable[..., Iterator[str]]:
    """Return a pytest fixture of ``scope`` that yields a running server's URL."""

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
            yield url

    return _postgres


postgres_url = make_postgres_fixture("session")
"""A session-wide server's URL (database ``postgres``)."""


@pytest.fixture
def postgres_db_url(postgres_url: str) -> str:
    """Return the URL of a new empty database for this test, on the session's server."""
    return create_database(postgres_url)
