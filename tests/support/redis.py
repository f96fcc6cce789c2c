"""A throwaway Redis server on 127.0.0.1 for tests.

``redis_server(tmp_dir)`` starts ``redis-server`` without persistence on a free port and yields
its URL (a ``RedisUrl``, a ``str`` that also carries the server's ``pid`` and ``port``). On
exit it stops the server by its pid (SIGTERM, SIGKILL after a timeout). A missing binary skips
the test with the install command (fails under ``KIKI_REQUIRE_SERVERS=1``).

Fixtures, to import into a test module::

    from tests.support.redis import redis_url  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import pid_alive
from tests.support.servers import find_binary, free_port

INSTALL_HINT = "apt-get install -y redis-server"
START_TIMEOUT = 30.0


class RedisUrl(str):
    """The URL of a running test server, with the server's pid and port."""

    pid: int
    port: int

    def __new__(cls, url: str, *, pid: int, port: int) -> RedisUrl:
        self = super().__new__(cls, url)
        self.pid = pid
        self.port = port
        return self


def _ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(tmp_dir: Path) -> Iterator[RedisUrl]:
    """Start ``redis-server`` on 127.0.0.1 (no persistence) and yield its URL."""
    binary = find_binary("redis-server", INSTALL_HINT)
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp_dir / "redis.log"
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_dir), "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(port):
            if process.poll() is not None:
                text = log.read_text(errors="replace") if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {process.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer PING")
            time.sleep(0.02)
        yield RedisUrl(f"redis://127.0.0.1:{port}/0", pid=process.pid, port=port)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        assert not pid_alive(process.pid)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisUrl]:
    """A session-wide Redis server's URL."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
