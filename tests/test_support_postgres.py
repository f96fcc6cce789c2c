"""The throwaway PostgreSQL helper: it serves SQL over 127.0.0.1 and stops by its pid."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.postgres import (
    pid_alive,
    postgres_db_url,  # noqa: F401  (fixture)
    postgres_server,
    postgres_url,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.server


def _round_trip(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            version = conn.execute(text("select version()")).scalar_one()
            assert version.startswith("PostgreSQL 15"), version
            conn.execute(text("create table t (id serial primary key, amount numeric(12, 2))"))
            conn.execute(text("insert into t (amount) values (1.10), (2.25)"))
            total = conn.execute(text("select sum(amount) from t")).scalar_one()
            assert str(total) == "3.35"
    finally:
        engine.dispose()


def test_postgres_fixture_serves_sql_on_localhost_despite_block_network(
    postgres_url: str,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
) -> None:
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert postgres_url.endswith("/postgres")
    assert postgres_db_url.rsplit("/", 1)[0] == postgres_url.rsplit("/", 1)[0]
    _round_trip(postgres_db_url)
    # --block-network patches Python's socket.connect (even for 127.0.0.1) but not libpq's.
    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(RuntimeError, match="Network is disabled"):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_postgres_server_stops_by_pid_on_exit(tmp_path: Path) -> None:
    with postgres_server(tmp_path) as url:
        pid = url.pid  # type: ignore[attr-defined]
        assert pid_alive(pid)
        _round_trip(url)
    assert not pid_alive(pid)
    assert (tmp_path / "postgres.log").exists()
