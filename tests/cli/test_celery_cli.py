"""``push --executor celery`` and ``worker`` refuse settings that cannot work, before any
computation or any task: exit 2 with one line naming the variable."""

from __future__ import annotations

import pytest

from .test_push import contracts, push_args, run


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "SQLite cannot be shared between machines"),
        ({"KIKI_LEDGER_URL": "sqlite:///ledger.db"}, "Set KIKI_LEDGER_URL to a PostgreSQL URL"),
        ({"KIKI_LEDGER_URL": "postgresql+psycopg://kiki@db/kiki"}, "set KIKI_BROKER_URL"),
    ],
)
def test_push_with_celery_refuses_a_ledger_or_broker_that_cannot_be_shared(
    tmp_path, env: dict[str, str], message: str
) -> None:
    done = run(
        tmp_path,
        *push_args(tmp_path, contracts(tmp_path, '["json"]'), "--executor", "celery"),
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "data").exists()  # no ledger was created


def test_worker_refuses_sqlite(tmp_path) -> None:
    done = run(tmp_path, "worker")
    assert done.returncode == 2, done.stderr
    assert "SQLite cannot be shared between machines" in done.stderr


def test_no_wait_needs_the_celery_executor(tmp_path) -> None:
    done = run(tmp_path, *push_args(tmp_path, contracts(tmp_path, '["json"]'), "--no-wait"))
    assert done.returncode == 2
    assert "--no-wait needs --executor celery" in done.stderr


def test_an_unknown_executor_is_refused(tmp_path) -> None:
    done = run(
        tmp_path, *push_args(tmp_path, contracts(tmp_path, '["json"]'), "--executor", "dask")
    )
    assert done.returncode == 2
    assert "--executor" in done.stderr


def test_help_names_the_executor_and_the_worker(tmp_path) -> None:
    assert "--executor" in run(tmp_path, "push", "--help").stdout
    assert "--concurrency" in run(tmp_path, "worker", "--help").stdout


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (("--executor", "celery"), {}, "SQLite cannot be shared between machines"),
        (
            ("--executor", "celery"),
            {"KIKI_LEDGER_URL": "postgresql+psycopg://kiki@db/kiki"},
            "set KIKI_BROKER_URL",
        ),
        (("--no-wait",), {}, "--no-wait needs --executor celery"),
        (("--executor", "ray"), {}, "--executor"),
    ],
)
def test_retry_refuses_an_executor_that_cannot_work_before_opening_the_ledger(
    tmp_path, extra: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    path = contracts(tmp_path, '["json"]')
    done = run(tmp_path, "retry", "--contracts", str(path), *extra, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "data").exists()
