"""The ``kiki-billing`` command line.

Only typer is imported at start-up; each command imports what it needs when it runs, so
``kiki-billing --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from kiki_billing import __version__
from kiki_billing.audit_cli import audit_app
from kiki_billing.cli_support import reports_errors


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kiki-billing {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="kiki-billing",
    help="Compute outcome-based profit-share invoices and deliver them to billing systems.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _log_level(value: str | None) -> str | None:
    if value is not None:
        # Read by every command's logging set-up (as KIKI_LOG_LEVEL is), checked there.
        os.environ["KIKI_LOG_LEVEL"] = value
    return value


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            callback=_log_level,
            help="DEBUG, INFO, WARNING (default) or ERROR; also KIKI_LOG_LEVEL.",
        ),
    ] = None,
) -> None:
    """Compute outcome-based profit-share invoices and deliver them to billing systems."""


PeriodOption = Annotated[str, typer.Option("--period", help="Billing month, YYYY-MM.")]
ContractsOption = Annotated[
    Path,
    typer.Option(
        "--contracts", envvar="KIKI_CONTRACTS", help="Contracts file (TOML).", dir_okay=False
    ),
]
MetricsOption = Annotated[
    Path | None, typer.Option("--metrics", help="Metrics CSV file.", dir_okay=False)
]
AuditOption = Annotated[
    Path | None, typer.Option("--audit", help="Hash-chained audit trail.", dir_okay=False)
]
PrometheusOption = Annotated[str | None, typer.Option("--prometheus", help="Prometheus base URL.")]
TimeoutOption = Annotated[
    float, typer.Option("--prometheus-timeout", help="Seconds per Prometheus query (0-600).")
]
IssueDateOption = Annotated[
    str | None,
    typer.Option("--issue-date", help="YYYY-MM-DD; default: the day after the period."),
]
AllowOpenOption = Annotated[
    bool,
    typer.Option(
        "--allow-open-period", help="Bill a period that has not ended yet (numbers may grow)."
    ),
]
AllowEmptyOption = Annotated[
    bool,
    typer.Option("--allow-empty", help="A source with no rows for the period is not an error."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command()
@reports_errors
def compute(
    period: PeriodOption,
    contracts: ContractsOption,
    metrics: MetricsOption = None,
    audit: AuditOption = None,
    prometheus: PrometheusOption = None,
    prometheus_timeout: TimeoutOption = 30.0,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("kiki-out"),
    json_output: Annotated[
        bool, typer.Option("--json", help="Print summary and invoices as JSON.")
    ] = False,
    issue_date: IssueDateOption = None,
    allow_open_period: AllowOpenOption = False,
    allow_empty: AllowEmptyOption = False,
) -> None:
    """Compute one invoice per client for a period and write JSON and CSV files."""
    from kiki_billing.cli_compute import run_compute

    run_compute(
        period=period,
        contracts=contracts,
        metrics=metrics,
        audit=audit,
        prometheus=prometheus,
        prometheus_timeout=prometheus_timeout,
        out=out,
        json_output=json_output,
        issue_date=issue_date,
        allow_open_period=allow_open_period,
        allow_empty=allow_empty,
    )


@app.command()
@reports_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("kiki-out"),
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Compute the worked example (January 2026, four clients) from the bundled sample data."""
    from kiki_billing.cli_compute import run_demo

    run_demo(out=out, json_output=json_output)


ExecutorOption = Annotated[
    str,
    typer.Option(
        "--executor",
        envvar="KIKI_EXECUTOR",
        help="local: this process; celery: tasks for `kiki-billing worker`s "
        "(KIKI_BROKER_URL, a PostgreSQL KIKI_LEDGER_URL).",
    ),
]
NoWaitOption = Annotated[
    bool,
    typer.Option(
        "--no-wait", help="With --executor celery: queue the deliveries and return at once."
    ),
]


@app.command()
@reports_errors
def push(
    period: PeriodOption,
    contracts: ContractsOption,
    metrics: MetricsOption = None,
    audit: AuditOption = None,
    prometheus: PrometheusOption = None,
    prometheus_timeout: TimeoutOption = 30.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")
    ] = False,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    client: Annotated[str | None, typer.Option("--client", help="Only this client id.")] = None,
    issue_date: IssueDateOption = None,
    allow_open_period: AllowOpenOption = False,
    allow_empty: AllowEmptyOption = False,
    skip_untargeted: Annotated[
        bool,
        typer.Option(
            "--skip-untargeted",
            help="Push the others when a billable client has no targets (it is not billed).",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No tables or bars; errors and a summary line.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    executor: ExecutorOption = "local",
    no_wait: NoWaitOption = False,
    amend: Annotated[
        bool,
        typer.Option(
            "--amend",
            help="Issue a new revision of every invoice whose recomputed content differs from "
            "the one issued: void it (unpaid) or credit it (paid) wherever it went, then push "
            "the revision. Shows the differences and asks first.",
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="With --amend: do not ask (for scripts).")
    ] = False,
) -> None:
    """Compute the period's invoices and deliver each to its client's targets.

    Exits 0 only when every delivery is delivered; 1 when any failed, was deferred or is held
    by another process, or an issued invoice changed (run with --amend); 2 for bad input or
    configuration (nothing sent). With ``--no-wait``, 0 once every delivery is recorded and
    queued.
    """
    from kiki_billing.cli_delivery import run_push

    run_push(
        amend=amend,
        yes=yes,
        period=period,
        contracts=contracts,
        metrics=metrics,
        audit=audit,
        prometheus=prometheus,
        prometheus_timeout=prometheus_timeout,
        dry_run=dry_run,
        target=target,
        client=client,
        issue_date=issue_date,
        allow_open_period=allow_open_period,
        allow_empty=allow_empty,
        skip_untargeted=skip_untargeted,
        quiet=quiet,
        no_progress=no_progress,
        executor=executor.strip().lower(),
        wait=not no_wait,
    )


@app.command()
@reports_errors
def worker(
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", help="Deliveries at once in this worker (1-256).")
    ] = 8,
    pool: Annotated[
        str, typer.Option("--pool", help="threads (default), prefork or solo.")
    ] = "threads",
    name: Annotated[
        str, typer.Option("--name", "-n", help="The worker's node name (name@host).")
    ] = "kiki@%h",
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery's log level.")] = "INFO",
    ping: Annotated[
        bool,
        typer.Option(
            "--ping", help="Only ask the running worker --name to answer (for probes): exit 0 or 1."
        ),
    ] = False,
) -> None:
    """Run a Celery worker that delivers what `push --executor celery` queues.

    Reads the same settings as push (KIKI_BROKER_URL, a PostgreSQL KIKI_LEDGER_URL, the
    adapters' KIKI_<TARGET>_* variables).
    """
    from kiki_billing.cli_celery import run_worker

    run_worker(concurrency=concurrency, pool=pool, name=name, loglevel=loglevel, ping=ping)


@app.command()
@reports_errors
def retry(
    contracts: ContractsOption,
    period: Annotated[str | None, typer.Option("--period", help="Only this month.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    client: Annotated[str | None, typer.Option("--client", help="Only this client id.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No tables or bars.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    executor: ExecutorOption = "local",
    no_wait: NoWaitOption = False,
) -> None:
    """Re-drive failed and deferred deliveries, with the current contracts file and settings.

    Exits like ``push``: 0 only when every re-driven delivery is delivered.
    """
    from kiki_billing.cli_delivery import run_retry

    run_retry(
        contracts=contracts,
        period=period,
        target=target,
        client=client,
        quiet=quiet,
        no_progress=no_progress,
        executor=executor.strip().lower(),
        wait=not no_wait,
    )


@app.command()
@reports_errors
def status(
    period: Annotated[str | None, typer.Option("--period", help="Only this month.")] = None,
    client: Annotated[str | None, typer.Option("--client", help="Only this client id.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state", help="Only this state: pending, in_flight, delivered, failed, deferred."
        ),
    ] = None,
    invoice: Annotated[str | None, typer.Option("--invoice", help="Only this invoice.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Show recorded deliveries: which account of which target holds what.

    Exits 1 when anything shown is failed, deferred, or in flight with no live holder.
    """
    from kiki_billing.cli_delivery import run_status

    run_status(
        period=period,
        client=client,
        target=target,
        state=state,
        invoice=invoice,
        json_output=json_output,
    )


@app.command()
@reports_errors
def show(
    invoice: Annotated[str, typer.Argument(help="Invoice number, KIKI-OaaS-YYYYMM-NNNNNN.")],
    json_output: JsonOption = False,
) -> None:
    """Show one invoice, each of its deliveries and every step with key, ids and errors."""
    from kiki_billing.cli_delivery import run_show

    run_show(invoice=invoice, json_output=json_output)


@app.command()
@reports_errors
def reconcile(
    period: Annotated[str | None, typer.Option("--period", help="Only this month.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Check each billing system against the ledger, invoice by invoice (read-only).

    Every delivered invoice exists there exactly once, with the same amount, currency and
    status, and no object carrying our numbers is unknown to the ledger.

    Exits 0 when everything matches, 1 on any drift, 2 for bad input or settings.
    """
    from kiki_billing.cli_reconcile import run_reconcile

    run_reconcile(period=period, target=target, json_output=json_output)


@app.command()
@reports_errors
def connect(
    target: Annotated[str, typer.Argument(help="The adapter to connect: quickbooks or xero.")],
    port: Annotated[
        int, typer.Option("--port", help="Port of the 127.0.0.1 redirect (0: any free one).")
    ] = 8765,
    redirect_path: Annotated[
        str, typer.Option("--redirect-path", help="Path of the redirect URI.")
    ] = "/callback",
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Print the consent address only.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the consent (1-3600).")
    ] = 300.0,
) -> None:
    """Authorize kiki-billing at an OAuth provider and store its first tokens in the ledger.

    The redirect URI (http://127.0.0.1:PORT/callback) must be registered with the app.
    """
    from kiki_billing.cli_connect import run_connect

    run_connect(
        target=target,
        port=port,
        open_browser=not no_browser,
        timeout=timeout,
        redirect_path=redirect_path,
    )


@app.command("adapters")
@reports_errors
def list_adapters() -> None:
    """List installed adapters, whether each one's SDK is present, and how to install it."""
    from kiki_billing.cli_delivery import run_adapters

    run_adapters()


metrics_app = typer.Typer(
    help="Prometheus metrics computed from the ledger.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
webhooks_app = typer.Typer(
    help="Receive payment states from Stripe, QuickBooks and Xero webhooks.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
HostOption = Annotated[str, typer.Option("--host", help="Address to listen on.")]
MetricsContractsOption = Annotated[
    Path | None,
    typer.Option(
        "--contracts",
        envvar="KIKI_CONTRACTS",
        help="Contracts file whose [defaults] share_rate is the default share (else 10%).",
        dir_okay=False,
    ),
]


@metrics_app.command("serve")
@reports_errors
def metrics_serve(
    host: HostOption = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")
    ] = 9464,
    contracts: MetricsContractsOption = None,
) -> None:
    """Serve /metrics (Prometheus text format) and /healthz until interrupted."""
    from kiki_billing.cli_metrics import run_metrics_serve

    run_metrics_serve(host=host, port=port, contracts=contracts)


@metrics_app.command("write")
@reports_errors
def metrics_write(
    file: Annotated[
        Path, typer.Argument(help="The .prom file to replace (node_exporter textfile).")
    ],
    contracts: MetricsContractsOption = None,
) -> None:
    """Write the metrics in node_exporter's textfile format, atomically (for cron)."""
    from kiki_billing.cli_metrics import run_metrics_write

    run_metrics_write(file=file, contracts=contracts)


@webhooks_app.command("serve")
@reports_errors
def webhooks_serve(
    host: HostOption = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")
    ] = 8000,
    max_body: Annotated[
        int,
        typer.Option("--max-body", min=1024, max=67_108_864, help="Largest body accepted, bytes."),
    ] = 1_048_576,
) -> None:
    """Receive webhooks at /webhooks/<target>: payment states go to the ledger.

    Targets with KIKI_<TARGET>_WEBHOOK_SECRET set are served (stripe, quickbooks, xero).
    """
    from kiki_billing.cli_webhooks import run_webhooks_serve

    run_webhooks_serve(host=host, port=port, max_body=max_body)


@app.command("sync-status")
@reports_errors
def sync_status(
    period: Annotated[str | None, typer.Option("--period", help="Only this month.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Read the payment state of delivered invoices back from each provider (no webhooks).

    Exits 1 when a provider could not be read for some delivery.
    """
    from kiki_billing.cli_webhooks import run_sync_status

    run_sync_status(period=period, target=target, json_output=json_output)


app.add_typer(audit_app, name="audit")
app.add_typer(metrics_app, name="metrics")
app.add_typer(webhooks_app, name="webhooks")


def main() -> None:
    """Console-script entry point."""
    app()
