"""Benchmark: push N invoices through the hub to a rate-limited, slow local Stripe fake.

Usage::

    python bench/deliver.py [--invoices 2000] [--rate 100] [--rate-mode both|bucket|window]
                            [--latency 0.05] [--concurrency K]
                            [--skip-sequential | --no-sequential]

Computes N one-campaign invoices in-process (not timed), then, for each simulator, starts
``tests.support.fake_stripe`` as a subprocess and pushes them as ``kiki-billing push`` does,
minus the CLI (``plan_deliveries`` + ``Hub`` + ``StripeAdapter``, a fresh SQLite ledger):

- ``bucket``: a token bucket at ``--rate`` (the old simulator, lenient to bursts);
- ``window``: at most ``--rate`` requests in any sliding second, 429 without ``Retry-After``, as
  Stripe counts its live limit (the strict one).

It prints each push's wall time, the lower bound (requests the fake received / rate), their
ratio and the 429s, checks that every invoice exists upstream exactly once with the right
total, and compares with the targets: wall <= 1.10x the bound and 429s under 1% of requests.
With the bucket simulator it also times a naive sequential loop (the adapter's steps one after
another: no threads, ledger, limiter or retry) for the speed-up; ``--skip-sequential`` times a
sample and projects it, ``--no-sequential`` skips it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiki_billing_adapters.stripe import (
    StripeAdapter,
    StripeSettings,
    invoice_total_minor,
)

from kiki_billing.config import ContractsFile, ExportSettings
from kiki_billing.hub.dispatcher import Hub
from kiki_billing.hub.keys import idempotency_key
from kiki_billing.hub.ledger import DeliveryState, Ledger
from kiki_billing.hub.plan import Delivery, plan_deliveries
from kiki_billing.hub.settings import HubSettings
from kiki_billing.logging import configure_logging
from kiki_billing.models import (
    BillingPeriod,
    CampaignMetrics,
    Contract,
    Invoice,
    SourceEvidence,
)
from kiki_billing.plugin import StepContext
from kiki_billing.profit_share import compute_run
from tests.support.fake_stripe import spawn_fake_stripe

PERIOD = "2026-01"
API_KEY = "sk_test_bench"
PLATFORMS = ("Meta Ads", "Google Ads", "TikTok Ads", "LinkedIn Ads")
SAMPLE_FOR_PROJECTION = 20


def cents(value: int) -> Decimal:
    """An amount with cents from an integer number of cents."""
    return Decimal(value).scaleb(-2)


def build_invoices(
    count: int, seed: int = 2026, targets: tuple[str, ...] = ("stripe",)
) -> tuple[ContractsFile, tuple[Invoice, ...]]:
    """``count`` clients with one campaign each, and their computed invoices."""
    rng = random.Random(seed)
    contracts = tuple(
        Contract(
            client_id=f"client_{n:05d}",
            name=f"Client {n}",
            email=f"billing+{n}@client-{n}.example",
            targets=targets,
        )
        for n in range(count)
    )
    metrics = []
    for n, contract in enumerate(contracts):
        spend = rng.randrange(100_000, 5_000_000)
        # NOTE: above the default baseline ROAS of 3.0, so every client owes a fee.
        ltv = spend * rng.randrange(320, 600) // 100 + rng.randrange(100)
        metrics.append(
            CampaignMetrics(
                client_id=contract.client_id,
                campaign_id=f"campaign_{n:05d}",
                campaign_name=f"Campaign {n}",
                platform=PLATFORMS[n % len(PLATFORMS)],
                spend=cents(spend),
                ltv=cents(ltv),
            )
        )
    evidence = SourceEvidence(kind="metrics_file", location="bench", record_count=len(metrics))
    run = compute_run(contracts, metrics, BillingPeriod.month(PERIOD), [evidence])
    if run.not_billed:
        raise SystemExit(f"{len(run.not_billed)} clients not billed; fix the generator")
    contracts_file = ContractsFile(
        path=Path("bench-contracts.toml"), contracts=contracts, exports=ExportSettings()
    )
    return contracts_file, run.invoices


class FakeControl:
    """The fake's ``/_fake/`` control endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.url}/_fake/{path}", method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def state(self) -> dict[str, Any]:
        return dict(self._call("GET", "state"))

    def reset(self) -> None:
        self._call("POST", "reset")


@dataclass(frozen=True)
class Traffic:
    """What the fake saw during one push."""

    requests: int
    by_route: Mapping[str, int]
    by_status: Mapping[int, int]
    span: float
    """Seconds from the first request's arrival to the last one's."""

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Traffic:
        requests = state["requests"]
        times = [r["time"] for r in requests]
        return cls(
            requests=len(requests),
            by_route=dict(Counter(f"{r['method']} {r['route'] or r['path']}" for r in requests)),
            by_status=dict(Counter(r["status"] for r in requests)),
            span=(max(times) - min(times)) if times else 0.0,
        )


@dataclass(frozen=True)
class Check:
    """Whether the fake holds exactly the invoices we meant to send."""

    invoices: int
    missing: int
    duplicated: int
    wrong_total: int
    customers: int
    invoice_items: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.wrong_total)

    def describe(self) -> str:
        return (
            f"{self.invoices:,} Stripe invoices, {self.customers:,} customers, "
            f"{self.invoice_items:,} invoice items; missing {self.missing}, "
            f"duplicated {self.duplicated}, wrong total {self.wrong_total}"
        )


def check_fake(state: Mapping[str, Any], invoices: Sequence[Invoice]) -> Check:
    """One open Stripe invoice per invoice number, with the total the invoice says."""
    by_number: dict[str, list[Mapping[str, Any]]] = {}
    for remote in state["invoices"]:
        number = (remote.get("metadata") or {}).get("kiki_invoice_number")
        by_number.setdefault(number, []).append(remote)
    missing = duplicated = wrong_total = 0
    for invoice in invoices:
        found = by_number.get(invoice.number, [])
        if not found:
            missing += 1
            continue
        if len(found) > 1:
            duplicated += 1
        expected = invoice_total_minor(invoice)
        if any(r["total"] != expected or r["status"] != "open" for r in found):
            wrong_total += 1
    customers = Counter((c.get("metadata") or {}).get("kiki_client_id") for c in state["customers"])
    duplicated += sum(n - 1 for n in customers.values() if n > 1)
    return Check(
        invoices=len(state["invoices"]),
        missing=missing,
        duplicated=duplicated,
        wrong_total=wrong_total,
        customers=len(state["customers"]),
        invoice_items=len(state["invoice_items"]),
    )


def stripe_settings(url: str, rate: float, concurrency: int | None) -> StripeSettings:
    return StripeSettings(
        api_key=API_KEY,  # type: ignore[arg-type]
        api_base=url,
        rate_limit=f"{rate:g}/s",
        concurrency=concurrency,
    )


@dataclass(frozen=True)
class HubResult:
    wall: float
    states: Mapping[str, int]
    concurrency: int


def push_with_hub(
    contracts: ContractsFile, invoices: Sequence[Invoice], settings: StripeSettings
) -> HubResult:
    """What ``kiki-billing push`` does, minus the CLI, into a fresh ledger."""
    hub_settings = HubSettings()
    adapter = StripeAdapter(settings)
    with tempfile.TemporaryDirectory(prefix="kiki-bench-") as scratch:
        ledger = Ledger(
            f"sqlite:///{Path(scratch) / 'ledger.sqlite3'}",
            lease_seconds=hub_settings.lease_seconds,
        )
        try:
            plan = plan_deliveries(
                invoices,
                contracts,
                lambda _name: adapter,
                known_targets=[StripeAdapter.name],
            )
            deliveries = plan.deliveries
            hub = Hub(
                ledger,
                plan.adapters,
                hub_settings.retry_policy(),
                breaker_threshold=hub_settings.breaker_threshold,
                breaker_cooldown=hub_settings.breaker_cooldown,
            )
            began = time.perf_counter()
            outcomes = hub.push(deliveries)
            wall = time.perf_counter() - began
        finally:
            adapter.close()
            ledger.close()
    states = Counter(outcome.state.value for outcome in outcomes)
    if len(outcomes) != len(deliveries):
        states["(no outcome)"] = len(deliveries) - len(outcomes)
    return HubResult(wall, dict(states), adapter.rate_limit().concurrency)


def push_sequentially(
    deliveries: Sequence[Delivery], settings: StripeSettings
) -> tuple[float, int]:
    """The naive loop: each invoice's steps in order, one request at a time, no retry.

    Returns:
        The wall time and the number of invoices that failed.
    """
    adapter = StripeAdapter(settings)
    failures = 0
    began = time.perf_counter()
    try:
        for delivery in deliveries:
            invoice = delivery.invoice
            refs: dict[str, str] = {}
            try:
                for step in adapter.steps(invoice, delivery.client):
                    key = idempotency_key(invoice.number, invoice.revision, "stripe", step.name)
                    ctx = StepContext(
                        invoice=invoice,
                        client=delivery.client,
                        refs=dict(refs),
                        idempotency_key=key,
                    )
                    found = step.skip(ctx) if step.skip is not None else None
                    refs.update(found if found is not None else step.send(ctx, step.request(ctx)))
            except Exception as exc:
                failures += 1
                print(f"  sequential: {invoice.number} failed: {exc}", file=sys.stderr)
    finally:
        adapter.close()
    return time.perf_counter() - began, failures


def plain_deliveries(contracts: ContractsFile, invoices: Sequence[Invoice]) -> list[Delivery]:
    by_id = contracts.by_id()
    model = StripeAdapter.client_settings_model
    return [
        Delivery(
            invoice=inv,
            target="stripe",
            client=model.model_validate(by_id[inv.client_id].target_settings.get("stripe", {})),
            account="bench",
        )
        for inv in invoices
    ]


@dataclass(frozen=True)
class ModeResult:
    """One push of the hub against the fake in one rate mode."""

    mode: str
    requests: int
    bound: float
    wall: float
    throttled: int
    delivered: int
    check: Check

    @property
    def ratio(self) -> float:
        return self.wall / self.bound if self.bound else float("nan")

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0

    def ok(self, invoices: int) -> bool:
        return self.delivered == invoices and self.check.ok

    def meets_targets(self) -> bool:
        return self.ratio <= TARGET_RATIO and self.throttled_share < TARGET_THROTTLED


TARGET_RATIO = 1.10
TARGET_THROTTLED = 0.01


def run_mode(
    mode: str,
    args: argparse.Namespace,
    contracts: ContractsFile,
    invoices: Sequence[Invoice],
) -> tuple[ModeResult, float | None, bool]:
    """Push through the hub against a fresh fake in ``mode``; then the naive loop (bucket)."""
    fake_args = (
        *("--rate-limit", str(args.rate), "--rate-mode", mode),
        *("--latency", str(args.latency)),
    )
    seq_wall: float | None = None
    seq_ok = True
    with spawn_fake_stripe(*fake_args) as (url, process):
        fake = FakeControl(url)
        print(
            f"\n[{mode}] fake Stripe pid {process.pid}: rate limit {args.rate:g} req/s "
            f"({'any sliding second, no Retry-After' if mode == 'window' else 'token bucket'}), "
            f"latency {args.latency * 1000:g} ms"
        )
        settings = stripe_settings(url, args.rate, args.concurrency)
        result = push_with_hub(contracts, invoices, settings)
        state = fake.state()
        traffic = Traffic.from_state(state)
        check = check_fake(state, invoices)
        outcome = ModeResult(
            mode=mode,
            requests=traffic.requests,
            bound=traffic.requests / args.rate,
            wall=result.wall,
            throttled=traffic.by_status.get(429, 0),
            delivered=result.states.get(DeliveryState.DELIVERED.value, 0),
            check=check,
        )
        print(
            f"  hub (concurrency {result.concurrency}): {traffic.requests:,} requests in "
            f"{result.wall:.2f} s = {traffic.requests / result.wall:.1f} req/s; bound "
            f"{outcome.bound:.2f} s; ratio {outcome.ratio:.3f}x; 429s {outcome.throttled} "
            f"({outcome.throttled_share:.2%})"
        )
        print(f"  requests by route: {dict(sorted(traffic.by_route.items()))}")
        print(f"  outcomes: {dict(sorted(result.states.items()))}; fake: {check.describe()}")
        if mode == "bucket" and not args.skip_sequential_all:
            deliveries = plain_deliveries(contracts, invoices)
            fake.reset()
            if args.skip_sequential:
                sample = deliveries[:SAMPLE_FOR_PROJECTION]
                sample_wall, failures = push_sequentially(sample, settings)
                seq_wall = sample_wall * len(deliveries) / max(1, len(sample))
                seq_ok = failures == 0
                print(f"  sequential: {len(sample)} invoices in {sample_wall:.2f} s, projected")
            else:
                seq_wall, failures = push_sequentially(deliveries, settings)
                seq_ok = failures == 0 and check_fake(fake.state(), invoices).ok
                print(f"  sequential: {seq_wall:.2f} s, failures {failures}")
    return outcome, seq_wall, seq_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--invoices", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (fake and hub)")
    parser.add_argument(
        "--rate-mode",
        choices=("bucket", "window", "both"),
        default="both",
        help="the fake's limit: a token bucket, --rate in any sliding second, or both in turn",
    )
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="requests in flight (adapter default: 10)"
    )
    parser.add_argument(
        "--skip-sequential",
        action="store_true",
        help=f"time {SAMPLE_FOR_PROJECTION} invoices of the naive loop and project to N",
    )
    parser.add_argument(
        "--no-sequential",
        dest="skip_sequential_all",
        action="store_true",
        help="do not time the naive loop at all",
    )
    args = parser.parse_args()
    configure_logging()

    began = time.perf_counter()
    contracts, invoices = build_invoices(args.invoices)
    lines = sum(len(inv.lines) for inv in invoices)
    print(
        f"computed {len(invoices):,} invoices ({lines:,} lines) in "
        f"{time.perf_counter() - began:.2f} s"
    )
    modes = ["bucket", "window"] if args.rate_mode == "both" else [args.rate_mode]
    results = []
    seq_wall: float | None = None
    seq_ok = True
    for mode in modes:
        outcome, wall, ok = run_mode(mode, args, contracts, invoices)
        results.append(outcome)
        if wall is not None:
            seq_wall, seq_ok = wall, ok

    rows = [
        ("invoices", f"{len(invoices):,}"),
        ("rate limit / latency", f"{args.rate:g} req/s / {args.latency * 1000:g} ms"),
    ]
    for r in results:
        rows += [
            (f"[{r.mode}] requests / bound", f"{r.requests:,} / {r.bound:.2f} s"),
            (f"[{r.mode}] hub wall / bound", f"{r.wall:.2f} s / {r.ratio:.3f}x"),
            (f"[{r.mode}] 429s", f"{r.throttled} ({r.throttled_share:.2%} of requests)"),
            (
                f"[{r.mode}] failures / duplicates",
                f"{len(invoices) - r.delivered} / {r.check.duplicated}",
            ),
        ]
    if seq_wall is not None:
        hub_wall = results[0].wall
        rows.append(("sequential loop wall time", f"{seq_wall:.2f} s"))
        rows.append(("speed-up vs sequential", f"{seq_wall / hub_wall:.2f}x"))
    met = all(r.meets_targets() for r in results)
    rows.append(
        (
            f"targets (wall <= {TARGET_RATIO:.2f}x bound, 429s < {TARGET_THROTTLED:.0%})",
            "met" if met else "not met",
        )
    )
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    # NOTE: a benchmark prints numbers; only a wrong delivery (not a slow one) fails the run.
    return 0 if all(r.ok(len(invoices)) for r in results) and seq_ok else 1


if __name__ == "__main__":
    sys.exit(main())
