"""Benchmark: verify + aggregate an audit trail, then compute the invoices of the period.

Usage::

    python bench/compute.py [--records 1000000] [--clients 1000] [--campaigns 10] [--out DIR]
                            [--repeat 1]

Generates an audit trail (not timed; lines are written directly, not through the append API),
then times ``read_audit_trail`` (hash chain verification + per-campaign sums) and
``compute_run`` (one contract per client) and prints the records per second of the two.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiki_billing.models import BillingPeriod, Contract
from kiki_billing.profit_share import compute_run
from kiki_billing.sources.audit_trail import (
    HEADER,
    ZERO_HASH,
    format_timestamp,
    read_audit_trail,
)
from kiki_billing.sources.base import PeriodWindow

PERIOD = "2026-01"
PLATFORMS = ("Meta Ads", "Google Ads", "TikTok Ads", "LinkedIn Ads")


def generate(path: Path, records: int, clients: int, campaigns: int, seed: int = 2026) -> None:
    """Write an audit trail of ``records`` records spread over the period, in time order."""
    rng = random.Random(seed)
    start, end = BillingPeriod.month(PERIOD).bounds("UTC")
    step = (end - start) / max(records, 1)
    sha = hashlib.sha256
    prev = ZERO_HASH
    with path.open("w", encoding="utf-8", newline="\n") as out:
        out.write(HEADER + "\n")
        batch: list[str] = []
        for seq in range(1, records + 1):
            moment = start + step * (seq - 1) + timedelta(microseconds=rng.randrange(1000))
            client = rng.randrange(clients)
            campaign = rng.randrange(campaigns)
            if seq % 2:
                metric, cents = "spend", rng.randrange(100, 100_000)
            else:
                metric, cents = "ltv", rng.randrange(300, 400_000)
            if seq % 97 == 0:
                cents = -rng.randrange(1, 100)  # a small correction
            amount = f"{'-' if cents < 0 else ''}{abs(cents) // 100}.{abs(cents) % 100:02d}"
            body = (
                f"{seq},{format_timestamp(moment)},client_{client:05d},campaign_{campaign:03d},"
                f"{metric},{amount},Campaign {campaign},{PLATFORMS[campaign % 4]},{prev},"
            )
            prev = sha(body.encode()).hexdigest()
            batch.append(body + prev + "\n")
            if len(batch) >= 50_000:
                out.write("".join(batch))
                batch.clear()
        out.write("".join(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--campaigns", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="keep the trail in DIR")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs (default 1)")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse DIR/audit-trail.csv if it exists (with --out)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "audit-trail.csv"
        if not (args.reuse and path.exists()):
            began = time.perf_counter()
            generate(path, args.records, args.clients, args.campaigns)
            print(f"generated in {time.perf_counter() - began:.1f} s (not timed)")
        print(f"trail: {path} ({path.stat().st_size / 1e6:.1f} MB)")

        period = BillingPeriod.month(PERIOD)
        window = PeriodWindow(period)
        contracts = [
            Contract(client_id=f"client_{n:05d}", name=f"Client {n}") for n in range(args.clients)
        ]
        for run_no in range(1, args.repeat + 1):
            gc.collect()  # each run starts from the same heap (the previous results are gone)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            metrics = read_audit_trail(path, window)
            wall1, cpu1 = time.perf_counter(), time.process_time()
            run = compute_run(contracts, metrics.metrics, period, [metrics.evidence])
            wall2, cpu2 = time.perf_counter(), time.process_time()
            records = metrics.evidence.record_count
            fee = ", ".join(f"{t.total_fee} {t.currency}" for t in run.summary.by_currency)
            print(
                f"run {run_no}: {records:,} records | read_audit_trail (verify + aggregate) "
                f"{wall1 - wall0:.3f} s wall, {cpu1 - cpu0:.3f} s cpu | compute_run "
                f"{wall2 - wall1:.3f} s wall, {cpu2 - cpu1:.3f} s cpu | verify + compute: "
                f"{records / (wall2 - wall0):,.0f} records/s wall, "
                f"{records / (cpu2 - cpu0):,.0f} records/s cpu | {len(run.invoices):,} invoices, "
                f"total fee {fee or 0}"
            )
            del metrics, run


if __name__ == "__main__":
    main()
