"""The Grafana dashboard against a real Prometheus scraping ``kiki-billing metrics serve``.

After the demo push (the worked example, January 2026, file targets), a real Prometheus server
scrapes ``metrics serve`` and every panel's query is run on it: each returns data, and the
revenue panel reads 8,121.00. The committed JSON is checked to be what the generator makes,
and every metric it uses to be one kiki-billing exports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiki_billing import metrics as names
from kiki_billing.dashboard import OUTPUT, panel_queries, render_dashboard
from tests.support.prometheus import LOCALHOST_ONLY, prometheus_server
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "kiki_billing" / "data"
WAIT = 120.0  # a generous bound for a busy machine; never a measured duration


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiki_billing", *args],
        cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True, check=False,
    )  # fmt: skip


def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIKI_")}
    return env | {
        "KIKI_DATA_DIR": str(tmp_path / "data"),
        "KIKI_LOG_LEVEL": "WARNING",
        "KIKI_ADAPTER_PACKAGES": "kiki-billing",
    }


def demo_push(tmp_path: Path) -> None:
    done = cli(
        tmp_path, "push", "--period", "2026-01", "--contracts", str(DATA / "sample_contracts.toml"),
        "--metrics", str(DATA / "sample_metrics.csv"), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(check, what: str) -> object:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {WAIT} s")
        time.sleep(0.2)


@pytest.fixture
def metrics_server(tmp_path: Path) -> Iterator[str]:
    """``kiki-billing metrics serve`` on a free port, after the demo push."""
    demo_push(tmp_path)
    port = free_port()
    log = (tmp_path / "metrics-serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "kiki_billing", "metrics", "serve", "--port", str(port)],
        cwd=tmp_path, env=environment(tmp_path), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"127.0.0.1:{port}"
    try:
        wait_for(
            lambda: process.poll() is not None or get(f"http://{base}/healthz")[0] == 200,
            "metrics serve answering /healthz",
        )
        assert process.poll() is None, (tmp_path / "metrics-serve.log").read_text()
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    assert process.returncode == 0, (tmp_path / "metrics-serve.log").read_text()


def instant(prometheus: str, expr: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": expr})
    status, body = get(f"{prometheus}/api/v1/query?{query}")
    assert status == 200, body
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]["result"]


@pytest.mark.server
@pytest.mark.block_network(allowed_hosts=[LOCALHOST_ONLY])
def test_every_panel_returns_data_from_a_real_prometheus(
    metrics_server: str, tmp_path: Path
) -> None:
    status, body = get(f"http://{metrics_server}/metrics")
    assert status == 200 and b"kiki_ooaS_revenue_total_micros" in body
    with prometheus_server(None, tmp_path / "prometheus", scrape=[metrics_server]) as prometheus:
        wait_for(
            lambda: instant(prometheus, names.REVENUE.name), "a scrape of kiki_ooaS_* by Prometheus"
        )
        for query in panel_queries():
            result = instant(prometheus, query.expr)
            assert result, f"panel {query.panel!r}: {query.expr} returned no data"
        [revenue] = instant(prometheus, "sum(kiki_ooaS_revenue_total_micros) / 1e6")
        assert float(revenue["value"][1]) == 8121.00
        [january] = instant(
            prometheus, 'sum(kiki_ooaS_revenue_total_micros{month="2026-01"}) / 1e6'
        )
        assert float(january["value"][1]) == 8121.00
        [share] = instant(prometheus, names.SHARE_PERCENTAGE.name)
        assert float(share["value"][1]) == 10
        margins = {
            r["metric"]["campaign_id"]: float(r["value"][1])
            for r in instant(
                prometheus, "sum by (campaign_id) (kiki_ooaS_margin_recovered_micros) / 1e6"
            )
        }
        assert margins == {
            "campaign_001": 22090.0,
            "campaign_002": 32130.0,
            "campaign_003": 17530.0,
            "campaign_004": 9460.0,
        }
        [up] = instant(prometheus, 'up{job="kiki-billing"}')
        assert up["value"][1] == "1"


def test_the_committed_dashboard_is_what_the_generator_makes() -> None:
    assert OUTPUT.read_text(encoding="utf-8") == render_dashboard(), (
        "config/grafana/kiki-billing.json is stale: run python -m kiki_billing.dashboard"
    )


def test_every_metric_the_dashboard_uses_exists() -> None:
    exported = {sample for metric in names.ALL for sample in names.sample_names(metric)}
    board = json.loads(OUTPUT.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert sorted(exprs) == sorted(q.expr for q in panel_queries())
    used = {name for expr in exprs for name in re.findall(r"\bkiki_[A-Za-z_]+\b", expr)}
    assert used and used <= exported, used - exported
    panels = {p["title"] for p in board["panels"] if p["type"] != "row"}
    assert {
        "OaaS revenue",
        "MRR per month",
        "Margin recovered per campaign",
        "Invoices by status",
        "Delivery health per target",
        "Oldest undelivered invoice",
    } <= panels
    revenue = next(p for p in board["panels"] if p["title"] == "OaaS revenue")
    assert revenue["targets"][0]["expr"] == "sum(kiki_ooaS_revenue_total_micros) / 1e6"


def test_the_exported_metrics_include_every_one_the_dashboard_uses(tmp_path: Path) -> None:
    demo_push(tmp_path)
    done = cli(tmp_path, "metrics", "write", str(tmp_path / "kiki.prom"))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "kiki.prom").read_text()
    exposed = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    }
    board = OUTPUT.read_text(encoding="utf-8")
    used = set(re.findall(r"\bkiki_[A-Za-z_]+\b", board))
    assert used <= exposed, used - exposed
