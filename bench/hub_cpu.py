"""Benchmark: the hub's own CPU per delivered invoice, to a file target and to Stripe.

Usage::

    python bench/hub_cpu.py [--invoices 2000] [--targets json,stripe] [--profile]

Computes N one-campaign invoices (not timed), then pushes them through ``plan_deliveries`` and
the ``Hub`` as ``kiki-billing push`` does, into a fresh SQLite ledger, and prints the CPU time
of this process (user + system, all threads) per delivered invoice. For Stripe the local fake
runs in another process with no rate limit and no latency, so its CPU is not counted and the
hub is not paced: what is measured is the hub, the ledger and the SDK, per invoice. It also
times loading a contracts file of 10,000 clients. ``--profile`` prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "adapters"))

from kiki_billing_adapters.files import JsonFileAdapter, JsonSettings
from kiki_billing_adapters.stripe import StripeAdapter, StripeSettings

from bench.deliver import build_invoices
from kiki_billing.config import load_contracts
from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import plan_deliveries
from kiki_billing.hub.retry import RetryPolicy
from kiki_billing.logging import configure_logging
from tests.support.fake_stripe import spawn_fake_stripe


def cpu() -> float:
    usage = time.process_time()
    return usage


def push(adapter, contracts, invoices, scratch: Path, profile: bool) -> tuple[float, float, int]:
    ledger = Ledger(f"sqlite:///{scratch / f'{adapter.name}.sqlite3'}")
    plan = plan_deliveries(
        invoices,
        contracts,
        lambda _name: adapter,
        known_targets=["json", "stripe"],
        target=adapter.name,
    )
    hub = Hub(ledger, plan.adapters, RetryPolicy())
    profiler = cProfile.Profile() if profile else None
    began_cpu, began = cpu(), time.perf_counter()
    if profiler:
        profiler.enable()
    outcomes = hub.push(plan.deliveries)
    if profiler:
        profiler.disable()
    spent, wall = cpu() - began_cpu, time.perf_counter() - began
    ledger.close()
    delivered = sum(o.state is DeliveryState.DELIVERED for o in outcomes)
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    return spent, wall, delivered


def contracts_file(count: int, path: Path) -> float:
    blocks = [
        f'[[clients]]\nid = "client_{n:05d}"\nname = "Client {n}"\ntargets = ["json", "stripe"]\n'
        f'[clients.stripe]\ncollection = "auto"\n'
        for n in range(count)
    ]
    path.write_text("\n".join(blocks))
    began = time.perf_counter()
    loaded = load_contracts(path)
    assert len(loaded.contracts) == count
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--invoices", type=int, default=2000)
    parser.add_argument("--targets", default="json,stripe")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--stripe-concurrency", type=int, default=10, help="requests in flight (Stripe default)"
    )
    args = parser.parse_args()
    configure_logging("WARNING")
    contracts, invoices = build_invoices(args.invoices, targets=("json", "stripe"))
    wanted = args.targets.split(",")
    with tempfile.TemporaryDirectory(prefix="kiki-cpu-") as tmp:
        scratch = Path(tmp)
        rows = []
        if "json" in wanted:
            adapter = JsonFileAdapter(JsonSettings(dir=scratch / "json"))
            spent, wall, done = push(adapter, contracts, invoices, scratch, args.profile)
            rows.append(("json file target", spent, wall, done))
        if "stripe" in wanted:
            with spawn_fake_stripe("--latency", "0") as (url, _process):
                settings = StripeSettings(
                    api_key="sk_test_bench",  # type: ignore[arg-type]
                    api_base=url,
                    rate_limit="100000/s",
                    concurrency=args.stripe_concurrency,
                )
                adapter = StripeAdapter(settings)
                spent, wall, done = push(adapter, contracts, invoices, scratch, args.profile)
                adapter.close()
                rows.append(("stripe (local fake)", spent, wall, done))
        load = contracts_file(10_000, scratch / "contracts.toml")
    print(f"{len(invoices):,} invoices, one campaign each")
    for name, spent, wall, done in rows:
        print(
            f"{name:<22} CPU {spent * 1000 / len(invoices):6.2f} ms/invoice "
            f"(wall {wall:.2f} s, delivered {done:,})"
        )
    print(f"{'contracts file':<22} 10,000 clients loaded in {load:.2f} s")
    return 0 if all(done == len(invoices) for *_, done in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
