"""The Grafana dashboard ``config/grafana/kiki-billing.json``, generated from code.

Built with Grafana's ``grafana-foundation-sdk`` (``pip install 'kiki-billing[dashboard]'``).
Regenerate after changing a panel, and commit the JSON (a test checks it is up to date)::

    python -m kiki_billing.dashboard            # writes config/grafana/kiki-billing.json
    python -m kiki_billing.dashboard --check    # exit 1 if the committed file is stale

Every query is an instant query over the metrics of :mod:`kiki_billing.metrics`, so each panel
shows the ledger's current figures whatever time range is picked. The Prometheus data source
is a dashboard variable: the import asks for none and any Prometheus data source can be chosen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiki_billing import metrics as names

DASHBOARD_UID = "kiki-billing"
OUTPUT = Path(__file__).resolve().parent.parent / "config" / "grafana" / "kiki-billing.json"
DATASOURCE = "${datasource}"


@dataclass(frozen=True)
class PanelQuery:
    """One query of one panel (what the real-Prometheus test runs)."""

    panel: str
    expr: str
    legend: str = ""


def _panel_queries() -> dict[str, list[PanelQuery]]:
    revenue = names.REVENUE.name
    margin = names.MARGIN_RECOVERED.name
    return {
        "OaaS revenue": [PanelQuery("OaaS revenue", f"sum({revenue}) / 1e6")],
        "MRR per month": [
            PanelQuery("MRR per month", f"sum by (month) ({revenue}) / 1e6", "{{month}}")
        ],
        "Profit share": [PanelQuery("Profit share", names.SHARE_PERCENTAGE.name, "{{client_id}}")],
        "Invoices by status": [
            PanelQuery(
                "Invoices by status", f"sum by (status) ({names.INVOICES.name})", "{{status}}"
            )
        ],
        "Margin recovered per campaign": [
            PanelQuery(
                "Margin recovered per campaign",
                f"sum by (campaign_id) ({margin}) / 1e6",
                "{{campaign_id}}",
            )
        ],
        "Oldest undelivered invoice": [
            PanelQuery("Oldest undelivered invoice", names.OLDEST_UNDELIVERED.name)
        ],
        "Deliveries per target and state": [
            PanelQuery(
                "Deliveries per target and state",
                f"sum by (target, state) ({names.DELIVERIES.name})",
                "{{target}} {{state}}",
            )
        ],
        "Delivery health per target": [
            PanelQuery(
                "Delivery health per target",
                f"sum by (target) ({names.DELIVERY_ATTEMPTS.name})",
                "{{target}} delivery attempts",
            ),
            PanelQuery(
                "Delivery health per target",
                f"sum by (target) ({names.PROVIDER_REQUESTS.name})",
                "{{target}} provider requests",
            ),
            PanelQuery(
                "Delivery health per target",
                f"sum by (target) ({names.RATE_LIMITED.name})",
                "{{target}} 429s",
            ),
            PanelQuery(
                "Delivery health per target",
                f"sum by (target) ({names.RATE_LIMIT_WAIT.name})",
                "{{target}} rate-limit wait (s)",
            ),
            PanelQuery(
                "Delivery health per target",
                f"max by (target) ({names.CIRCUIT_OPEN.name})",
                "{{target}} circuit open",
            ),
        ],
        "Delivery latency p95": [
            PanelQuery(
                "Delivery latency p95",
                "histogram_quantile(0.95, sum by (target, le) "
                f"({names.DELIVERY_LATENCY.name}_bucket))",
                "{{target}}",
            )
        ],
        "Payment states per target": [
            PanelQuery(
                "Payment states per target",
                f"sum by (target, state) ({names.PAYMENT_STATES.name})",
                "{{target}} {{state}}",
            )
        ],
    }


def panel_queries() -> list[PanelQuery]:
    """Every query of every panel, in dashboard order."""
    return [query for queries in _panel_queries().values() for query in queries]


def build_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (plain data, ready to ``json.dumps``)."""
    from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat
    from grafana_foundation_sdk.builders.common import ReduceDataOptions
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import (
        BarGaugeDisplayMode,
        BigValueColorMode,
        BigValueGraphMode,
        VizOrientation,
    )
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val="prometheus", uid=DATASOURCE)
    queries = _panel_queries()
    ids = itertools.count(1)

    def targets(title: str) -> list[Any]:
        found = []
        for index, query in enumerate(queries[title]):
            target = (
                prometheus.Dataquery()
                .expr(query.expr)
                .instant()
                .ref_id(chr(ord("A") + index))
                .datasource(source)
            )
            if query.legend:
                target = target.legend_format(query.legend)
            found.append(target)
        return found

    def last_value() -> ReduceDataOptions:
        return ReduceDataOptions().calcs(["lastNotNull"]).values(False)

    def big_number(title: str, description: str, unit: str, decimals: int) -> Any:
        return (
            stat.Panel()
            .id(next(ids))
            .title(title)
            .description(description)
            .datasource(source)
            .targets(targets(title))
            .unit(unit)
            .decimals(decimals)
            .graph_mode(BigValueGraphMode.NONE)
            .color_mode(BigValueColorMode.VALUE)
            .reduce_options(last_value())
            .height(6)
            .span(6)
        )

    def bars(title: str, description: str, unit: str, decimals: int, span: int) -> Any:
        return (
            bargauge.Panel()
            .id(next(ids))
            .title(title)
            .description(description)
            .datasource(source)
            .targets(targets(title))
            .unit(unit)
            .decimals(decimals)
            .display_mode(BarGaugeDisplayMode.BASIC)
            .orientation(VizOrientation.HORIZONTAL)
            .reduce_options(last_value())
            .height(8)
            .span(span)
        )

    variable = dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    board = (
        dashboard.Dashboard("kiki-billing: OaaS revenue and delivery health")
        .uid(DASHBOARD_UID)
        .description(
            "Profit-share revenue, invoices by status and the delivery hub's health, from "
            "`kiki-billing metrics serve` (computed from the ledger)."
        )
        .tags(["kiki-billing", "billing", "oaas"])
        .time("now-30d", "now")
        .refresh("1m")
        .timezone("browser")
        .editable()
        .with_variable(variable)
        .with_row(dashboard.Row("Revenue").id(next(ids)))
        .with_panel(
            big_number(
                "OaaS revenue",
                "Sum of issued invoice totals (latest revision, not void), all months.",
                "none",
                2,
            )
        )
        .with_panel(
            big_number(
                "Profit share",
                "The default share rate; a client billed at another rate shows by name.",
                "percent",
                2,
            )
        )
        .with_panel(
            big_number(
                "Oldest undelivered invoice",
                "Age of the oldest delivery not delivered yet (0: all delivered).",
                "s",
                0,
            )
        )
        .with_panel(
            bars(
                "MRR per month",
                "Monthly recurring revenue: issued invoice totals per billing month.",
                "none",
                2,
                12,
            )
        )
        .with_panel(
            bars(
                "Invoices by status",
                "Issued invoices by current status (overdue: unpaid past due, client's zone).",
                "none",
                0,
                12,
            )
        )
        .with_panel(
            bars(
                "Margin recovered per campaign",
                "Attributed LTV minus baseline value on the campaign lines of issued invoices.",
                "none",
                2,
                12,
            )
        )
        .with_row(dashboard.Row("Delivery").id(next(ids)))
        .with_panel(
            bars(
                "Deliveries per target and state",
                "Deliveries in the ledger: pending, in flight, delivered, failed, deferred.",
                "none",
                0,
                12,
            )
        )
        .with_panel(
            bars(
                "Delivery health per target",
                "Delivery attempts, provider requests, 429s, seconds waited for rate-limit "
                "slots, and whether a circuit breaker is open (1).",
                "none",
                0,
                12,
            )
        )
        .with_panel(
            bars(
                "Delivery latency p95",
                "95th percentile of the time from a delivery's creation to its delivery.",
                "s",
                1,
                12,
            )
        )
        .with_panel(
            bars(
                "Payment states per target",
                "Delivered invoices by the payment state each provider reported.",
                "none",
                0,
                12,
            )
        )
    )
    model = board.build()
    data: dict[str, Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    return data


def render_dashboard() -> str:
    """The dashboard JSON exactly as committed (sorted keys, two-space indent, final newline)."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the dashboard, or with ``--check`` tell whether the committed one is current."""
    parser = argparse.ArgumentParser(prog="python -m kiki_billing.dashboard")
    parser.add_argument("--check", action="store_true", help="Exit 1 if the file is stale.")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="Where to write it.")
    args = parser.parse_args(argv)
    text = render_dashboard()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m kiki_billing.dashboard", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
