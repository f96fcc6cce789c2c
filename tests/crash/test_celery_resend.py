"""Deliveries sent again through Celery: tasks the broker lost, and ``retry``.

A waiting ``push --executor celery`` queues again the tasks the broker lost.

With a Redis broker a message taken by ``BRPOP`` is gone from the queue before the worker
records it as unacknowledged; a worker killed in between loses it for good. Here the test
plays that broker: it takes some of a push's messages off the queue before any worker runs.
The push, watching the ledger, sees the deliveries stop moving and sends their tasks again;
every invoice then exists once in the (fake) Stripe, and the push exits 0.

``retry --executor celery`` re-drives the deliveries that failed, through the workers, and
``push --amend --yes --executor celery`` voids the changed invoices and issues revision 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.crash.test_celery_crash import Stack, control
from tests.support.fake_stripe import spawn_fake_stripe
from tests.support.postgres import create_database, postgres_url  # noqa: F401
from tests.support.redis import redis_server

pytestmark = [
    pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"]),
    pytest.mark.server,
    pytest.mark.slow,
]

CLIENTS = 6
QUEUE = "kiki-lost-tasks"


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    contracts = ['[defaults]\ncurrency = "USD"\n']
    rows = ["client_id,campaign_id,spend,ltv,period"]
    for index in range(CLIENTS):
        contracts.append(
            f'[[clients]]\nid = "client-{index}"\nname = "Client {index}"\n'
            f'email = "ap@client-{index}.example"\ntargets = ["stripe"]\n'
        )
        rows.append(f"client-{index},camp-{index},{1000 + index}.00,{5000 + index}.00,2026-02")
    (tmp_path / "contracts.toml").write_text("\n".join(contracts))
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    with (
        redis_server(tmp_path / "redis") as redis_url,
        spawn_fake_stripe("--latency", "0.01") as (stripe, _process),
    ):
        ledger_url = create_database(request.getfixturevalue("postgres_url"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
        env = base | {
            "KIKI_LEDGER_URL": ledger_url,
            "KIKI_BROKER_URL": redis_url,
            "KIKI_CELERY_QUEUE": QUEUE,
            "KIKI_CELERY_RESEND_AFTER": "2",
            "KIKI_LEASE_SECONDS": "5",
            "KIKI_RETRY_MAX_SECONDS": "10",
            "KIKI_RETRY_MAX_RETRY_AFTER": "5",
            "KIKI_CELERY_VISIBILITY_TIMEOUT": "30",
            "KIKI_LOG_LEVEL": "WARNING",
            "KIKI_ADAPTER_PACKAGES": "kiki-billing",
            "KIKI_STRIPE_API_KEY": "sk_test_kiki_lost_tasks",
            "KIKI_STRIPE_API_BASE": stripe,
        }
        built = Stack(tmp_path, env, ledger_url, stripe, "")
        try:
            yield built
        finally:
            built.stop_all()


def kiki(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("kiki-billing")), *args]
    return subprocess.run(
        command, cwd=stack.root, env=stack.env, capture_output=True, text=True, timeout=120
    )


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("lost", [2, CLIENTS])
def test_a_waiting_push_queues_again_the_tasks_the_broker_lost(stack: Stack, lost: int) -> None:
    broker = redis.Redis.from_url(stack.env["KIKI_BROKER_URL"])
    push = stack.push()
    wait_for(lambda: broker.llen(QUEUE) == CLIENTS, "the push to queue its tasks")
    # The broker loses the next `lost` messages (those a worker would take first).
    for _ in range(lost):
        assert broker.rpop(QUEUE) is not None
    stack.start_worker(0)
    try:
        code = push.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the push waited for tasks the broker had lost")
    log = (stack.root / "push.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "push.resent" in log
    assert "no worker answered" in log  # the push began before the worker

    state = control(stack.stripe, "GET", "state")
    numbers = Counter(i["metadata"].get("kiki_invoice_number") for i in state["invoices"])
    assert len(numbers) == CLIENTS and set(numbers.values()) == {1}
    delivered = stack.query("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
    assert delivered[0][0] == CLIENTS


def test_retry_with_the_celery_executor_redrives_failed_deliveries(stack: Stack) -> None:
    # Stripe refuses two invoices (a permanent 400): those deliveries fail.
    control(
        stack.stripe,
        "POST",
        "faults",
        [{"preset": "400", "method": "POST", "path": "/v1/invoices", "times": 2}],
    )
    stack.start_worker(0)
    assert stack.push().wait(timeout=120) == 1
    states = stack.query("SELECT state, count(*) FROM deliveries GROUP BY state")
    assert sorted(states) == [("delivered", CLIENTS - 2), ("failed", 2)]

    # No worker runs while `retry` queues: the re-drive goes through the queue, not this process.
    stack.kill_worker(0)
    contracts = str(stack.root / "contracts.toml")
    done = kiki(stack, "retry", "--executor", "celery", "--no-wait", "--contracts", contracts)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 deliveries queued" in done.stdout
    states = stack.query("SELECT state, count(*) FROM deliveries GROUP BY state")
    assert sorted(states) == [("delivered", CLIENTS - 2), ("pending", 2)]
    stack.start_worker(0)
    wait_for(
        lambda: (
            stack.query("SELECT count(*) FROM deliveries WHERE state = 'delivered'")[0][0]
            == CLIENTS
        ),
        "the workers to deliver what retry queued",
    )
    state = control(stack.stripe, "GET", "state")
    numbers = Counter(i["metadata"].get("kiki_invoice_number") for i in state["invoices"])
    assert len(numbers) == CLIENTS and set(numbers.values()) == {1}


def test_an_amend_through_the_celery_executor_voids_and_reissues(stack: Stack) -> None:
    stack.start_worker(0)
    assert stack.push().wait(timeout=120) == 0
    # client-0's LTV was under-reported: its fee goes up; client-1's goes down.
    metrics = stack.root / "metrics.csv"
    rows = metrics.read_text().splitlines()
    rows[1] = "client-0,camp-0,1000.00,9000.00,2026-02"
    rows[2] = "client-1,camp-1,1001.00,4000.00,2026-02"
    metrics.write_text("\n".join(rows) + "\n")
    args = ["push", "--period", "2026-02", "--contracts", str(stack.root / "contracts.toml")]
    args += ["--metrics", str(metrics), "--executor", "celery", "--quiet"]
    plain = kiki(stack, *args)
    assert plain.returncode == 1 and "--amend" in plain.stdout + plain.stderr
    done = kiki(stack, *args, "--amend", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr

    state = control(stack.stripe, "GET", "state")
    revisions: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for inv in state["invoices"]:
        meta = inv["metadata"]
        revisions.setdefault((meta["kiki_client_id"], meta["kiki_revision"]), []).append(inv)
    assert all(len(found) == 1 for found in revisions.values())
    for client, fee in (("client-0", 60000), ("client-1", 9970)):
        assert revisions[(client, "0")][0]["status"] == "void"
        assert revisions[(client, "1")][0]["total"] == fee
    assert {client for client, revision in revisions if revision == "1"} == {
        "client-0",
        "client-1",
    }
    rows_ = stack.query("SELECT revision, state, count(*) FROM deliveries GROUP BY 1, 2")
    assert sorted(rows_) == [(0, "delivered", CLIENTS), (1, "delivered", 2)]
