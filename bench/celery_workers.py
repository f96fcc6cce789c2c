"""Benchmark: the same push through the Celery executor with 1, 2 and 4 workers.

Usage::

    python bench/celery_workers.py [--invoices 2000] [--workers 1,2,4] [--rate 100]
                                   [--latency 0.05] [--worker-concurrency 4]

Starts PostgreSQL and Redis on 127.0.0.1 (as the tests do) and the Stripe fake as a process
that admits at most ``--rate`` requests in any sliding second (429 without ``Retry-After``, as
Stripe counts its live limit) and answers each after ``--latency``. For each worker count it
starts that many ``kiki-billing worker`` processes on a fresh ledger, records and queues the
N invoices as ``push --executor celery`` does, and times them until every delivery is
settled. It prints, per count: wall time, requests the fake received, throughput, the
provider's bound (requests / rate), the 429s, and whether every invoice is in Stripe exactly
once. More workers should go faster until the bound, with no 429s: the workers share one
limiter in Redis. Figures on a busy 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "adapters"))

from kiki_billing_adapters.stripe import StripeAdapter, StripeSettings

from bench.deliver import FakeControl, Traffic, build_invoices, check_fake
from kiki_billing.config import ContractsFile
from kiki_billing.hub.celery_executor import TASK_NAME, enqueue, make_app, settle
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import plan_deliveries
from kiki_billing.hub.settings import HubSettings
from kiki_billing.models import Invoice
from tests.support.fake_stripe import spawn_fake_stripe
from tests.support.postgres import create_database, postgres_server
from tests.support.redis import redis_server

KIKI = Path(sys.executable).with_name("kiki-billing")
API_KEY = "sk_test_bench_celery"


def start_workers(count: int, env: dict[str, str], logs: Path, concurrency: int) -> list[Any]:
    workers = []
    for index in range(count):
        with (logs / f"worker-{count}-{index}.log").open("wb") as out:
            workers.append(
                subprocess.Popen(
                    [
                        str(KIKI),
                        "worker",
                        "--concurrency",
                        str(concurrency),
                        "--name",
                        f"bench{index}@%h",
                        "--loglevel",
                        "WARNING",
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return workers


def wait_ready(app: Any, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0)
        if len(replies) >= count:
            return
    raise SystemExit(f"only some of {count} workers answered within {timeout:.0f} s")


def stop_workers(workers: list[Any]) -> None:
    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def run_count(
    count: int,
    args: argparse.Namespace,
    invoices: Sequence[Invoice],
    contracts: ContractsFile,
    server: str,
    redis_url: str,
    url: str,
    root: Path,
) -> dict[str, Any]:
    """One push of every invoice with ``count`` workers, on a fresh ledger and Redis."""
    import redis

    fake = FakeControl(url)
    fake.reset()
    redis.Redis.from_url(redis_url).flushall()
    ledger_url = create_database(server)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
    env = base | {
        "KIKI_LEDGER_URL": ledger_url,
        "KIKI_BROKER_URL": redis_url,
        "KIKI_LOG_LEVEL": "ERROR",
        "KIKI_ADAPTER_PACKAGES": "kiki-billing",
        "KIKI_STRIPE_API_KEY": API_KEY,
        "KIKI_STRIPE_API_BASE": url,
        "KIKI_STRIPE_RATE_LIMIT": f"{args.rate:g}",
    }
    app = make_app(HubSettings(ledger_url=ledger_url, broker_url=redis_url))
    settings = StripeSettings(api_key=API_KEY, api_base=url, rate_limit=f"{args.rate:g}")  # type: ignore[arg-type]
    adapter = StripeAdapter(settings)
    ledger = Ledger(ledger_url)
    workers = start_workers(count, env, root, args.worker_concurrency)
    try:
        wait_ready(app, count)
        plan = plan_deliveries(invoices, contracts, lambda _n: adapter, known_targets=["stripe"])
        began = time.perf_counter()
        with app.producer_or_acquire() as producer:

            def send(payload: dict[str, Any]) -> None:
                app.send_task(TASK_NAME, kwargs={"payload": payload}, producer=producer)

            queued = enqueue(ledger, plan.deliveries, send)
        queued_at = time.perf_counter() - began
        while settle(ledger, queued):
            time.sleep(0.25)
        wall = time.perf_counter() - began
    finally:
        stop_workers(workers)
        ledger.close()
        adapter.close()
    state = fake.state()
    traffic = Traffic.from_state(state)
    check = check_fake(state, invoices)
    states = Counter(i.outcome.state for i in queued if i.outcome is not None)
    throttled = traffic.by_status.get(429, 0)
    bound = traffic.requests / args.rate
    row = {
        "workers": count,
        "wall": wall,
        "queued": queued_at,
        "requests": traffic.requests,
        "per_s": traffic.requests / wall,
        "bound": bound,
        "throttled": throttled,
        "delivered": states.get(DeliveryState.DELIVERED, 0),
        "ok": check.ok,
    }
    print(
        f"\n{count} worker(s): {wall:.1f} s ({queued_at:.1f} s recording and "
        f"queueing), {traffic.requests:,} requests = {row['per_s']:.1f} req/s; "
        f"bound {bound:.1f} s; 429s {throttled} ({throttled / traffic.requests:.2%}); "
        f"delivered {row['delivered']:,}/{len(invoices):,}; {check.describe()}"
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--invoices", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4", help="worker counts to run, in turn")
    parser.add_argument("--rate", type=float, default=100.0, help="the fake's requests/s")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--worker-concurrency", type=int, default=4, help="threads per worker")
    args = parser.parse_args()
    counts = [int(part) for part in args.workers.split(",")]

    contracts, invoices = build_invoices(args.invoices)
    print(
        f"{len(invoices):,} invoices; fake Stripe at {args.rate:g} req/s (sliding second), "
        f"{args.latency * 1000:g} ms per request; {args.worker_concurrency} threads a worker"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiki-bench-celery-") as scratch:
        root = Path(scratch)
        fake_args = ("--rate-mode", "window", "--rate-limit", str(args.rate))
        with (
            postgres_server(root / "postgres") as server,
            redis_server(root / "redis") as redis_url,
            spawn_fake_stripe(*fake_args, "--latency", str(args.latency)) as (url, _fake),
        ):
            for count in counts:
                rows.append(
                    run_count(count, args, invoices, contracts, server, redis_url, url, root)
                )
    print("\nworkers  wall s  req/s  bound s  wall/bound  429s")
    for row in rows:
        print(
            f"{row['workers']:>7}  {row['wall']:>6.1f}  {row['per_s']:>5.1f}  {row['bound']:>7.1f}"
            f"  {row['wall'] / row['bound']:>10.2f}  {row['throttled']:>4}"
        )
    # NOTE: a benchmark prints numbers; only a wrong delivery (not a slow one) fails the run.
    return 0 if all(r["ok"] and r["delivered"] == len(invoices) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
