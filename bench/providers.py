"""Benchmark: `kiki-billing push` to each billing system's fake at the provider's published limits.

Usage::

    python bench/providers.py [--providers quickbooks,xero,zuora,stripe] [--invoices N]
                              [--latency 0.05]

For each provider it starts that provider's local fake as a process, with the limits the
provider publishes (the fakes enforce them the strict way: sliding windows counted at arrival,
a cap on requests in flight), runs ``kiki-billing push`` for N one-campaign clients with the
adapter's default (published) limits, and prints the wall time of the push, the bound (the
longest of: requests / the binding window's rate, and requests x latency / requests allowed in
flight), their ratio, the 429s the fake answered, and whether every invoice is upstream once.

Published limits (PROVIDERS.md): Stripe 25/s in test mode; QuickBooks 10/s and 500/min and 10
in flight per realm; Xero 60/min, 5,000/day and 5 in flight per organisation; Zuora 50,000/min
and about 20 invoice-creating calls in flight per tenant. Xero's 60/min makes a large push
slow by design: the default 60 invoices already take about four minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "adapters"))

from kiki_billing.hub.registry import load_adapter_class  # noqa: E402
from kiki_billing.plugin import RateLimit, RateWindow  # noqa: E402
from tests.support.fake_provider import spawn_fake  # noqa: E402
from tests.support.fake_xero import (  # noqa: E402
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
)
from tests.support.fake_zuora import (  # noqa: E402
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ONE_TIME_CHARGE,
    ONE_TIME_RATE_PLAN,
)

KIKI = Path(sys.executable).with_name("kiki-billing")
DEFAULT_INVOICES = {"stripe": 500, "quickbooks": 300, "xero": 60, "zuora": 300}


def call(url: str, method: str, path: str, payload: Any = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read() or b"null")


def environment(target: str, url: str) -> dict[str, str]:
    """The adapter's settings pointing at its fake, with no limit overridden."""
    if target == "stripe":
        return {"KIKI_STRIPE_API_KEY": "sk_test_kiki_bench", "KIKI_STRIPE_API_BASE": url}
    if target == "quickbooks":
        tokens = call(url, "POST", "/_fake/quickbooks/tokens")
        return {
            "KIKI_QUICKBOOKS_CLIENT_ID": tokens["client_id"],
            "KIKI_QUICKBOOKS_CLIENT_SECRET": tokens["client_secret"],
            "KIKI_QUICKBOOKS_REFRESH_TOKEN": tokens["refresh_token"],
            "KIKI_QUICKBOOKS_REALM_ID": tokens["realm"],
            "KIKI_QUICKBOOKS_ENVIRONMENT": "sandbox",
            "KIKI_QUICKBOOKS_API_BASE": f"{url}/v3",
            "KIKI_QUICKBOOKS_TOKEN_URL": f"{url}/oauth2/v1/tokens/bearer",
        }
    if target == "xero":
        return {
            "KIKI_XERO_CLIENT_ID": DEFAULT_CLIENT_ID,
            "KIKI_XERO_CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
            "KIKI_XERO_REFRESH_TOKEN": "kiki-bench-xero-seed-" + "0" * 32,
            "KIKI_XERO_TENANT_ID": DEFAULT_TENANT,
            "KIKI_XERO_API_BASE": f"{url}/api.xro/2.0",
            "KIKI_XERO_TOKEN_URL": f"{url}/connect/token",
        }
    return {
        "KIKI_ZUORA_USERNAME": DEFAULT_USERNAME,
        "KIKI_ZUORA_PASSWORD": DEFAULT_PASSWORD,
        "KIKI_ZUORA_API_BASE": f"{url}/apps/services/a/78.0",
    }


def fake_arguments(target: str, latency: float) -> list[str]:
    arguments = ["--latency", str(latency), "--seed", "7"]
    if target == "stripe":
        arguments += ["--rate-mode", "window", "--rate-limit", "25"]
    if target == "xero":
        arguments += ["--refresh-token", "kiki-bench-xero-seed-" + "0" * 32]
    return arguments


def bound(limit: RateLimit, requests: int, latency: float) -> float:
    """The shortest time ``requests`` can take under ``limit`` at ``latency`` each.

    Each window that the run outgrows binds at its steady rate (a window the whole run fits
    into, such as Xero's 5,000 a day for a few hundred requests, does not bind); requests in
    flight bind at ``latency`` each.
    """
    binding = [w for w in limit.windows if requests > w.requests] or [limit.windows[0]]
    by_rate = max(requests * window.seconds / window.requests for window in binding)
    return max(by_rate, requests * latency / limit.concurrency)


def published_limit(target: str) -> RateLimit:
    """What the provider publishes for the account the benchmark uses."""
    if target == "stripe":  # a test-mode key: 25 requests a second (PROVIDERS.md)
        default = load_adapter_class(target).default_rate_limit
        return RateLimit((RateWindow(25, 1.0),), default.concurrency)
    return load_adapter_class(target).default_rate_limit


def workspace(root: Path, target: str, invoices: int) -> None:
    lines = ["client_id,campaign_id,spend,ltv,period"]
    clients = []
    for n in range(invoices):
        lines.append(f"client_{n:05d},campaign_{n:05d},{1000 + n}.00,{4000 + 3 * n}.00,2026-01")
        clients.append(
            f'[[clients]]\nid = "client_{n:05d}"\nname = "Client {n}"\ntargets = ["{target}"]\n'
        )
    (root / "metrics.csv").write_text("\n".join(lines) + "\n")
    extra = ""
    if target == "zuora":
        extra = (
            f'[targets.zuora]\nproduct_rate_plan_id = "{ONE_TIME_RATE_PLAN}"\n'
            f'product_rate_plan_charge_id = "{ONE_TIME_CHARGE}"\n\n'
        )
    (root / "contracts.toml").write_text(extra + "\n".join(clients))


def run(target: str, invoices: int, latency: float) -> dict[str, Any]:
    limit = published_limit(target)
    with tempfile.TemporaryDirectory(prefix=f"kiki-bench-{target}-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        workspace(root, target, invoices)
        url, _ = stack.enter_context(
            spawn_fake(f"tests.support.fake_{target}", *fake_arguments(target, latency))
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
        env |= environment(target, url) | {
            "KIKI_DATA_DIR": str(root / "data"),
            "KIKI_ADAPTER_PACKAGES": "kiki-billing",
            "KIKI_LOG_LEVEL": "ERROR",
        }
        command = [str(KIKI), "push", "--period", "2026-01", "--contracts", "contracts.toml"]
        command += ["--metrics", "metrics.csv", "--quiet"]
        began = time.perf_counter()
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - began
        state = call(url, "GET", "/_fake/state")
    # The fake's own counters: requests it admitted (the ones the limits allow) and refused.
    limits = state.get("rate_limits") or {}
    requests = int(limits.get("admitted") or len(state.get("requests", [])))
    throttled = int(limits.get("rejected", 0))
    return {
        "target": target,
        "invoices": invoices,
        "exit": done.returncode,
        "summary": done.stdout.strip().splitlines()[-1:] or [done.stderr.strip()[-200:]],
        "requests": requests,
        "bound": bound(limit, requests, latency),
        "wall": wall,
        "throttled": throttled,
        "limit": str(limit),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--providers", default="quickbooks,xero,zuora,stripe")
    parser.add_argument("--invoices", type=int, default=None, help="default: per provider")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    args = parser.parse_args()
    results = []
    for target in args.providers.split(","):
        invoices = args.invoices or DEFAULT_INVOICES[target]
        print(f"{target}: pushing {invoices} invoices ...", flush=True)
        result = run(target, invoices, args.latency)
        results.append(result)
        print(
            f"  {result['summary'][0]} (exit {result['exit']}); {result['requests']} requests in "
            f"{result['wall']:.1f} s; bound {result['bound']:.1f} s "
            f"({result['limit']}, {args.latency * 1000:g} ms each); "
            f"ratio {result['wall'] / result['bound']:.3f}x; 429s {result['throttled']}",
            flush=True,
        )
    print()
    print(
        f"{'provider':<12}{'invoices':>9}{'requests':>10}{'bound s':>10}{'wall s':>9}"
        f"{'wall/bound':>12}{'429s':>6}"
    )
    for r in results:
        print(
            f"{r['target']:<12}{r['invoices']:>9}{r['requests']:>10}{r['bound']:>10.1f}"
            f"{r['wall']:>9.1f}{r['wall'] / r['bound']:>12.3f}{r['throttled']:>6}"
        )
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
