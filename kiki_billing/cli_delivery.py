"""``push``, ``retry``, ``status``, ``show`` and ``adapters`` (imported when they run)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from kiki_billing.cli_compute import compute_from_options, money, parse_period, plain
from kiki_billing.cli_support import console, err_console, warn
from kiki_billing.errors import ConfigurationError, InputError
from kiki_billing.models import revision_number
from kiki_billing.money import format_money

if TYPE_CHECKING:
    from rich.progress import Progress

    from kiki_billing.hub.ledger import DeliveryRecord, Ledger
    from kiki_billing.hub.plan import Delivery, Plan
    from kiki_billing.hub.revisions import Amendment
    from kiki_billing.hub.runner import DeliveryOutcome, Preview
    from kiki_billing.hub.settings import HubSettings
    from kiki_billing.models import Invoice


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.partition("://")[0] + "://..."


@contextlib.contextmanager
def open_ledger(settings: HubSettings, *, must_exist: bool = False) -> Iterator[Ledger | None]:
    """The ledger the settings name; ``None`` with ``must_exist`` when there is none yet.

    Raises:
        ConfigurationError: The ledger cannot be opened (the URL is named without password;
            a missing database driver names the extra to install).
    """
    import sqlalchemy

    from kiki_billing.hub.ledger import Ledger
    from kiki_billing.hub.settings import driver_hint

    url = settings.ledger_location()
    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigurationError(
            "KIKI_LEDGER_URL is not a database URL (sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DB)"
        ) from None
    if (
        must_exist
        and settings.ledger_url is None
        and not (settings.data_dir / "ledger.sqlite3").exists()
    ):
        yield None
        return
    if settings.ledger_url is None:
        with contextlib.suppress(OSError):
            settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        ledger = Ledger(url, lease_seconds=settings.lease_seconds)
    except (ModuleNotFoundError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise ConfigurationError(
            f"cannot open the ledger {_safe_url(url)}: its database driver is missing "
            f"({type(exc).__name__}); {driver_hint(url)}"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ValueError, RuntimeError) as exc:
        detail = str(exc) if isinstance(exc, RuntimeError) else type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            detail = exc.strerror
        raise ConfigurationError(f"cannot open the ledger {_safe_url(url)}: {detail}") from None
    try:
        yield ledger
    finally:
        ledger.close()


def _credentials_factory(ledger: Ledger) -> Any:
    from kiki_billing.hub.credentials import LedgerCredentialStore

    return lambda target, account: LedgerCredentialStore(ledger, target, account)


# --------------------------------------------------------------------------------------------
# push and retry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Display:
    """How much a command prints."""

    quiet: bool = False
    progress: bool = True


def run_push(
    *,
    dry_run: bool,
    target: str | None,
    client: str | None,
    skip_untargeted: bool,
    quiet: bool,
    no_progress: bool,
    executor: str = "local",
    wait: bool = True,
    amend: bool = False,
    yes: bool = False,
    **options: Any,
) -> None:
    """``kiki-billing push`` (``--amend``: issue new revisions of changed invoices)."""
    from kiki_billing.hub.plan import plan_deliveries
    from kiki_billing.hub.registry import create_adapter, known_adapter_names
    from kiki_billing.hub.revisions import as_revision, plan_revisions

    if yes and not amend:
        raise InputError("--yes confirms --amend; use them together", field="--yes")
    settings = _executor_settings(executor, wait, check=not dry_run)
    computed = compute_from_options(**options)
    _check_targets(computed.run.invoices, computed.contracts, skip_untargeted, client)
    with (
        open_ledger(settings, must_exist=dry_run) as found,
        _ledger_or_scratch(found) as ledger,
    ):
        if computed.carries_forward():
            computed = computed.with_carried(ledger.carried_into(computed.run.period.label))
            _check_targets(computed.run.invoices, computed.contracts, skip_untargeted, client)
        for nb in computed.run.not_billed:
            if not quiet:
                err_console().print(f"{nb.client_id}: {not_billed_text(nb)}", markup=False)
        if computed.undated_source is not None:
            _check_undated_source(ledger, computed.undated_source, computed, record=not dry_run)
        if computed.carries_forward() and not dry_run:
            _record_carried(ledger, computed, client)
        revisions = plan_revisions(computed.run.invoices, ledger)
        invoices = list(revisions.current)
        amendments = [
            a for a in revisions.amendments if client is None or a.revised.client_id == client
        ]
        if amend:
            invoices.extend(a.revised for a in amendments)
        else:
            # Pushed under the revision issued: the ledger refuses the other content and the
            # outcome says to amend.
            invoices.extend(as_revision(a.revised, a.issued.revision) for a in revisions.amendments)
        plan = plan_deliveries(
            invoices,
            computed.contracts,
            lambda name: create_adapter(name, _credentials_factory(ledger)),
            known_targets=known_adapter_names(),
            target=target,
            client=client,
        )
        try:
            if amend:
                if not amendments:
                    console().print(
                        "Nothing to amend: every invoice matches the revision issued.",
                        markup=False,
                    )
                else:
                    show_amendments(ledger, amendments, plan)
                    if not dry_run:
                        _confirm_amendments(amendments, yes)
            if dry_run:
                _dry_run(ledger, plan, settings)
                return
            _record_terms(ledger, plan, computed.contracts)
            display = Display(quiet, not (quiet or no_progress))
            _execute(ledger, plan, settings, display, executor, wait=wait, redrive=False)
        finally:
            plan.close()


def not_billed_text(nb: Any) -> str:
    """Why a client of the run gets no invoice, in one line."""
    if nb.reason == "carried_forward":
        fee = format_money(nb.carried_fee, nb.currency)
        below = format_money(nb.carried_below, nb.currency)
        return (
            f"not billed (carried_forward: {fee} {nb.currency}, the total being below "
            f"{below}); carried to the next period's invoice"
        )
    return f"not billed ({nb.reason}); nothing to push"


def _record_carried(ledger: Ledger, computed: Any, client: str | None) -> None:
    """Keep the fees carried forward, and check that no invoiced period was carried already.

    Raises:
        InputError: A period's fee was carried and billed on a later invoice already.
    """
    from kiki_billing.hub.ledger import InvoiceConflictError

    period = computed.run.period.label
    try:
        for nb in computed.run.not_billed:
            if nb.reason == "carried_forward" and (client is None or nb.client_id == client):
                ledger.record_carried(nb.client_id, period, nb.currency, nb.carried_fee)
        for inv in computed.run.invoices:
            if client is None or inv.client_id == client:
                ledger.check_not_carried(inv.client_id, period)
    except InvoiceConflictError as exc:
        raise InputError(str(exc), field="carry_forward_below") from None


def _confirm_amendments(amendments: Sequence[Amendment], yes: bool) -> None:
    """Ask before issuing revisions (``--yes`` answers for scripts); exit 1 on no."""
    if yes:
        return
    count = len(amendments)
    question = f"Issue {count} new revision{'s' if count != 1 else ''} as shown above?"
    try:
        confirmed = typer.confirm(question, default=False, err=True)
    except typer.Abort:
        confirmed = False
    if not confirmed:
        err_console().print("Not confirmed: nothing was sent (pass --yes in scripts).")
        raise typer.Exit(1)


def show_amendments(ledger: Ledger, amendments: Sequence[Amendment], plan: Plan) -> None:
    """Print each amendment: total, lines and fields that changed, and what happens where."""
    from rich.table import Table

    out = console()
    for a in amendments:
        old, new = a.issued, a.revised
        cur = new.currency
        sign = "+" if a.difference > 0 else ""
        out.print(
            f"{new.number} ({plain(new.client_id).plain}): revision {old.revision} -> "
            f"{new.revision} ({new.document_number}): total {money(old.total_fee, old.currency)}"
            f" -> {money(new.total_fee, cur)} {cur} ({sign}{money(a.difference, cur)})",
            markup=False,
        )
        if a.lines:
            table = Table(show_edge=False)
            for column in ("Line", "Change", "Before", "After", "Difference"):
                left = column in ("Line", "Change")
                table.add_column(column, justify="left" if left else "right")
            zero = Decimal(0)
            for change in a.lines:
                table.add_row(
                    plain(change.description),
                    change.kind,
                    "" if change.before is None else money(change.before, cur),
                    "" if change.after is None else money(change.after, cur),
                    money((change.after or zero) - (change.before or zero), cur),
                )
            table.add_section()
            table.add_row(
                "Total",
                "",
                money(old.total_fee, old.currency),
                money(new.total_fee, cur),
                money(a.difference, cur),
            )
            out.print(table)
        for name, was, now in a.header:
            out.print(f"  {name}: {was} -> {now}", markup=False)
        reached = [
            r for r in ledger.deliveries(invoice_number=new.number) if r.revision < new.revision
        ]
        planned = {(d.target, d.account) for d in plan.deliveries if d.invoice is new}
        for record in reached:
            where = (record.target, record.account)
            fate = (
                "voided if unpaid, credited in full if paid, before the revision is pushed"
                if where in planned
                else "NOT corrected: no longer a target of this client or account"
            )
            out.print(
                f"  {record.target} (account {record.account}) holds revision "
                f"{record.revision} ({record.state.value}): {fate}",
                markup=False,
            )


@contextlib.contextmanager
def _ledger_or_scratch(ledger: Ledger | None) -> Iterator[Ledger]:
    """The ledger, or an empty in-memory one for a dry run before any push."""
    if ledger is not None:
        yield ledger
        return
    from kiki_billing.hub.ledger import Ledger

    scratch = Ledger("sqlite://")
    try:
        yield scratch
    finally:
        scratch.close()


def _record_terms(ledger: Ledger, plan: Plan, contracts: Any) -> None:
    """Keep each invoice's due date and its client's time zone, to tell when it is overdue."""
    from kiki_billing.hub.ledger.payments import DEFAULT_TIMEZONE, record_invoice_terms

    by_id = contracts.by_id()
    invoices = {(d.invoice.number, d.invoice.revision): d.invoice for d in plan.deliveries}
    record_invoice_terms(
        ledger,
        [
            (
                inv.number,
                inv.revision,
                inv.due_date,
                by_id[inv.client_id].timezone if inv.client_id in by_id else DEFAULT_TIMEZONE,
            )
            for inv in invoices.values()
        ],
    )


def _check_targets(
    invoices: Sequence[Invoice], contracts: Any, skip_untargeted: bool, client: str | None
) -> None:
    by_id = contracts.by_id()
    untargeted = [
        inv
        for inv in invoices
        if not by_id[inv.client_id].targets and (client is None or inv.client_id == client)
    ]
    if not untargeted:
        return
    names = ", ".join(
        f"{inv.client_id} ({format_money(inv.total_fee, inv.currency)} {inv.currency})"
        for inv in untargeted[:5]
    )
    more = f" and {len(untargeted) - 5} more" if len(untargeted) > 5 else ""
    message = f"billable clients without targets: {names}{more}"
    if not skip_untargeted:
        raise InputError(
            message + "; add targets = [...] to their contracts, or pass --skip-untargeted",
            file=str(contracts.path),
            field="targets",
        )
    warn(message + "; they are not billed anywhere")


def _check_undated_source(ledger: Ledger, sha256: str, computed: Any, *, record: bool) -> None:
    period = computed.run.period.label
    location = computed.run.summary.sources[0].location if computed.run.summary.sources else "?"
    bound = (
        ledger.record_undated_source(sha256, period, location)
        if record
        else ledger.undated_source_period(sha256)
    )
    if bound is not None and bound[0] != period:
        raise InputError(
            f"this metrics file has no period column and the same content was billed for "
            f"{bound[0]} (from {bound[1]}); add a period column, or use the file of {period}",
            file=location,
            field="period",
        )


def run_retry(
    *,
    contracts: Path,
    period: str | None,
    target: str | None,
    client: str | None,
    quiet: bool,
    no_progress: bool,
    executor: str = "local",
    wait: bool = True,
) -> None:
    """``kiki-billing retry``: re-plan failed and deferred deliveries with today's settings."""
    from kiki_billing.config import load_contracts
    from kiki_billing.hub.ledger import DeliveryState
    from kiki_billing.hub.plan import plan_deliveries
    from kiki_billing.hub.registry import create_adapter, known_adapter_names

    settings = _executor_settings(executor, wait, check=True)
    label = parse_period(period).label if period else None
    contracts_file = load_contracts(contracts)
    with open_ledger(settings) as ledger:
        assert ledger is not None
        records = ledger.deliveries(
            period=label,
            states=[DeliveryState.FAILED, DeliveryState.DEFERRED],
            target=target,
            client_id=client,
        )
        latest = ledger.latest_revisions(r.invoice_number for r in records)
        for record in records:
            newest = latest.get(record.invoice_number, record.revision)
            if record.revision < newest:
                warn(
                    f"{record.invoice_number} revision {record.revision} to {record.target}: not "
                    f"retried, superseded by revision {newest} (whose delivery corrects it)"
                )
        records = [r for r in records if r.revision >= latest.get(r.invoice_number, r.revision)]
        if not records:
            console().print("Nothing to retry.")
            return
        wanted: dict[str, set[str]] = {}
        invoices = {}
        for record in records:
            wanted.setdefault(record.invoice_number, set()).add(record.target)
            key = (record.invoice_number, record.revision)
            if key not in invoices:
                invoices[key] = ledger.load_invoice(*key)
        plan = plan_deliveries(
            list(invoices.values()),
            contracts_file,
            lambda name: create_adapter(name, _credentials_factory(ledger)),
            known_targets=known_adapter_names(),
            only=wanted,
        )
        try:
            stranded = {(r.invoice_number, r.target, r.account) for r in records} - {
                (d.invoice.number, d.target, d.account) for d in plan.deliveries
            }
            for number, name, account in sorted(stranded):
                warn(
                    f"{number} to {name} account {account}: not retried (the contracts file or "
                    "the settings no longer send it there)"
                )
            _record_terms(ledger, plan, contracts_file)
            display = Display(quiet, not (quiet or no_progress))
            _execute(ledger, plan, settings, display, executor, wait=wait, redrive=True)
        finally:
            plan.close()


def _executor_settings(executor: str, wait: bool, *, check: bool) -> HubSettings:
    """The hub's settings, refused (before any work) when the executor cannot run with them."""
    from kiki_billing.hub.settings import load_hub_settings

    if executor not in ("local", "celery"):
        raise InputError("unknown executor (local or celery)", field="--executor")
    if not wait and executor != "celery":
        raise InputError("--no-wait needs --executor celery", field="--no-wait")
    settings = load_hub_settings()
    if executor == "celery" and check:
        from kiki_billing.hub.celery_executor import check_distributed

        check_distributed(settings)
    return settings


def _execute(
    ledger: Ledger,
    plan: Plan,
    settings: HubSettings,
    display: Display,
    executor: str,
    *,
    wait: bool,
    redrive: bool,
) -> None:
    """Deliver the plan in this process, or queue it for the Celery workers."""
    if executor == "celery":
        from kiki_billing.cli_celery import push_with_celery

        push_with_celery(ledger, plan, settings, display, wait=wait, redrive=redrive)
    else:
        _drive(ledger, plan, settings, display, redrive)


def target_progress(counts: Mapping[str, int], display: Display) -> tuple[Progress, dict[str, Any]]:
    """A progress bar per target (on stderr, log lines printed above it) and their task ids."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        disable=not display.progress,
        redirect_stderr=True,
    )
    tasks = {name: progress.add_task(name, total=count) for name, count in sorted(counts.items())}
    return progress, tasks


def _drive(
    ledger: Ledger, plan: Plan, settings: HubSettings, display: Display, redrive: bool
) -> None:
    from kiki_billing.hub.dispatcher import Hub

    progress, tasks = target_progress(Counter(d.target for d in plan.deliveries), display)
    lock = threading.Lock()

    def advance(outcome: DeliveryOutcome) -> None:
        with lock:
            progress.advance(tasks[outcome.target])

    hub = Hub(
        ledger,
        plan.adapters,
        settings.retry_policy(),
        breaker_threshold=settings.breaker_threshold,
        breaker_cooldown=settings.breaker_cooldown,
        on_outcome=advance,
    )
    with progress:
        outcomes = hub.push(plan.deliveries, redrive_failed=redrive)
    show_outcomes(outcomes, quiet=display.quiet)
    if not all(outcome.ok for outcome in outcomes):
        raise typer.Exit(1)


def show_outcomes(outcomes: list[DeliveryOutcome], *, quiet: bool = False) -> None:
    """Print what went where (a table, then a one-line tally)."""
    from rich.table import Table

    if not quiet:
        table = Table(title="Deliveries")
        for column in ("Client", "Invoice", "Target", "Account", "State", "Provider ids", "Note"):
            table.add_column(column)
        for outcome in outcomes:
            table.add_row(
                plain(outcome.client_id),
                revision_number(outcome.invoice_number, outcome.revision),
                outcome.target,
                plain(outcome.account),
                outcome.state.value,
                plain(_refs(outcome.refs)),
                plain(outcome.error or outcome.note or ""),
            )
        console().print(table)
    for outcome in outcomes:
        if not outcome.ok:
            # In full, on one line: a table cell truncates, and scripts grep for the reason.
            err_console().print(
                f"{revision_number(outcome.invoice_number, outcome.revision)} "
                f"{outcome.target}: {outcome.state.value}: "
                f"{outcome.error or outcome.note or ''}",
                markup=False,
                soft_wrap=True,
            )
    tally = Counter(outcome.state.value for outcome in outcomes)
    console().print(
        ", ".join(f"{count} {state}" for state, count in sorted(tally.items()))
        or "nothing to deliver",
        markup=False,
    )


def _dry_run(ledger: Ledger, plan: Plan, settings: HubSettings) -> None:
    """Print, per target, exactly what ``push`` would do; exit 1 if some would fail."""
    from kiki_billing.hub.dispatcher import Hub
    from kiki_billing.plugin import DeliveryError

    hub = Hub(ledger, plan.adapters, settings.retry_policy())
    by_target: dict[str, list[Delivery]] = {}
    for delivery in plan.deliveries:
        by_target.setdefault(delivery.target, []).append(delivery)
    failing = 0
    out = console()
    for target, items in sorted(by_target.items()):
        adapter = plan.adapters[target]
        out.rule(f"{target} (account {adapter.account}): {len(items)} invoices")
        for delivery in items:
            inv = delivery.invoice
            fee = format_money(inv.total_fee, inv.currency)
            head = f"{inv.number} {inv.client_id} {fee} {inv.currency}"
            try:
                preview: Preview | None = hub.preview(delivery)
            except DeliveryError as exc:
                preview = None
                failing += 1
                error = exc.scrubbed(adapter.secrets())
                out.print(f"{head}: would fail: {error}", markup=False)
            if preview is None:
                continue
            if preview.conflict:
                failing += 1
            out.print(f"{head}: {preview.verdict}", markup=False)
            for step in preview.steps:
                if step.request is None or step.action.value == "already delivered":
                    out.print(
                        f"  {step.name}: already delivered {_refs(step.recorded or {})}",
                        markup=False,
                    )
                    continue
                payload = json.dumps(dict(step.request.payload), sort_keys=True, default=str)
                out.print(
                    f"  {step.name}: {step.action.value}: {step.request.method} "
                    f"{step.request.path} {adapter.key_carrier} {step.idempotency_key} {payload}",
                    markup=False,
                    soft_wrap=True,
                )
    if failing:
        err_console().print(f"{failing} deliveries would fail", markup=False)
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# status and show
# --------------------------------------------------------------------------------------------


def _stuck(record: DeliveryRecord, now: float) -> bool:
    from kiki_billing.hub.ledger import DeliveryState, owner_is_dead

    if record.state is not DeliveryState.IN_FLIGHT:
        return False
    return owner_is_dead(record.owner) or (record.lease_until or 0) < now


def run_status(
    *,
    period: str | None,
    client: str | None,
    target: str | None,
    state: str | None,
    invoice: str | None,
    json_output: bool,
) -> None:
    """``kiki-billing status``: exit 1 when anything shown is failed, deferred or stuck."""
    from rich.table import Table

    from kiki_billing.hub.ledger import DeliveryState
    from kiki_billing.hub.settings import load_hub_settings

    label = parse_period(period).label if period else None
    states = None
    if state is not None:
        try:
            states = [DeliveryState(state.strip())]
        except ValueError:
            choices = ", ".join(s.value for s in DeliveryState)
            raise InputError(f"unknown state (one of {choices})", field="--state") from None
    with open_ledger(load_hub_settings(), must_exist=True) as ledger:
        records = (
            []
            if ledger is None
            else ledger.deliveries(
                period=label,
                states=states,
                target=target,
                client_id=client,
                invoice_number=invoice,
            )
        )
        payments = _payment_views(ledger, records) if ledger is not None else {}
        latest = (
            {} if ledger is None else ledger.latest_revisions(r.invoice_number for r in records)
        )
    now = time.time()
    stuck = {r.id for r in records if _stuck(r, now)}
    superseded = {
        r.id: latest[r.invoice_number]
        for r in records
        if r.revision < latest.get(r.invoice_number, r.revision)
    }
    if json_output:
        print(
            json.dumps(
                [
                    _record_data(r, r.id in stuck, superseded.get(r.id)) | payments[r.id].data()
                    for r in records
                ],
                indent=2,
            )
        )
    else:
        table = Table(title="Deliveries" + (f", {label}" if label else ""))
        for column in (
            "Period",
            "Invoice",
            "Client",
            "Target",
            "Account",
            "State",
            "Payment",
            "Attempts",
            "Provider ids",
            "Last error",
        ):
            table.add_column(column)
        for r in records:
            table.add_row(
                r.period,
                f"{r.invoice_number} r{r.revision}",
                plain(r.client_id),
                r.target,
                plain(r.account),
                r.state.value
                + (" (stuck: holder gone)" if r.id in stuck else "")
                + (f" (superseded by r{superseded[r.id]})" if r.id in superseded else ""),
                payments[r.id].text(),
                str(r.attempts),
                plain(_refs(r.refs)),
                plain(r.last_error or ""),
            )
        console().print(table)
        tally = Counter(r.state.value for r in records)
        console().print(
            ", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "no deliveries recorded",
            markup=False,
        )
    # A superseded revision is settled by its successor's delivery (which corrects it).
    unsettled = [
        r
        for r in records
        if (r.state in (DeliveryState.FAILED, DeliveryState.DEFERRED) or r.id in stuck)
        and r.id not in superseded
    ]
    if unsettled:
        raise typer.Exit(1)


@dataclass(frozen=True)
class PaymentView:
    """A delivery's payment state as ``status`` shows it."""

    delivered: bool
    state: str | None
    amount_paid: str | None
    event_id: str | None
    source: str | None
    updated_at: str | None
    due_date: str
    timezone: str
    overdue: bool

    def text(self) -> str:
        """``paid``, ``open, overdue``, ``unknown`` (delivered, nothing heard), ``-``."""
        if not self.delivered:
            return "-"
        shown = self.state or "unknown"
        return f"{shown}, overdue" if self.overdue else shown

    def data(self) -> dict[str, Any]:
        """The JSON fields."""
        return {
            "payment_state": self.state,
            "amount_paid": self.amount_paid,
            "payment_event": self.event_id,
            "payment_source": self.source,
            "payment_updated_at": self.updated_at,
            "due_date": self.due_date,
            "timezone": self.timezone,
            "overdue": self.overdue,
        }


def _payment_views(ledger: Ledger, records: Sequence[DeliveryRecord]) -> dict[int, PaymentView]:
    from datetime import UTC, datetime

    from kiki_billing.hub.ledger import DeliveryState
    from kiki_billing.hub.ledger.payments import (
        DEFAULT_TIMEZONE,
        invoice_terms,
        is_overdue,
        payment_records,
    )

    payments = payment_records(ledger, [r.id for r in records])
    terms = invoice_terms(ledger) if records else {}
    tracked = {name: _tracks_payments(name) for name in {r.target for r in records}}
    now = datetime.now(UTC)
    views = {}
    for r in records:
        key = (r.invoice_number, r.revision)
        if key not in terms:
            terms[key] = (ledger.load_invoice(*key).due_date, DEFAULT_TIMEZONE)
        due, zone = terms[key]
        payment = payments.get(r.id)
        # A file target has no payment state: its deliveries show "-", never overdue.
        delivered = r.state is DeliveryState.DELIVERED and tracked[r.target]
        views[r.id] = PaymentView(
            delivered=delivered,
            state=payment.state.value if payment else None,
            amount_paid=format(payment.amount_paid, "f")
            if payment and payment.amount_paid is not None
            else None,
            event_id=payment.event_id if payment else None,
            source=payment.source if payment else None,
            updated_at=payment.updated_at.isoformat() if payment else None,
            due_date=due.isoformat(),
            timezone=zone,
            overdue=delivered and is_overdue(due, zone, payment.state if payment else None, now),
        )
    return views


def _tracks_payments(target: str) -> bool:
    """Whether the target's billing system records payments (assumed when it cannot load)."""
    from kiki_billing.hub.registry import load_adapter_class

    try:
        return load_adapter_class(target).tracks_payments
    except ConfigurationError:
        return True


def _record_data(
    r: DeliveryRecord, stuck: bool, superseded_by: int | None = None
) -> dict[str, Any]:
    return {
        "invoice": r.invoice_number,
        "revision": r.revision,
        "superseded_by": superseded_by,
        "client_id": r.client_id,
        "period": r.period,
        "target": r.target,
        "account": r.account,
        "state": r.state.value,
        "stuck": stuck,
        "attempts": r.attempts,
        "refs": r.refs,
        "last_error": r.last_error,
        "updated_at": r.updated_at.isoformat(),
    }


def run_show(*, invoice: str, json_output: bool) -> None:
    """``kiki-billing show INVOICE``."""
    from rich.table import Table

    from kiki_billing.hub.settings import load_hub_settings

    number = invoice.strip()
    with open_ledger(load_hub_settings(), must_exist=True) as ledger:
        revisions = ledger.invoice_revisions(number) if ledger is not None else []
        if ledger is None or not revisions:
            raise InputError(f"no invoice {number!r} in the ledger", field="INVOICE")
        records = ledger.deliveries(invoice_number=number)
        steps = {r.id: ledger.steps(r.id) for r in records}
        documents = {rev: ledger.load_invoice(number, rev) for rev in revisions}
    now = time.time()
    if json_output:
        data = {
            "invoice": number,
            "revisions": [documents[rev].model_dump(mode="json") for rev in revisions],
            "deliveries": [
                {
                    **_record_data(r, _stuck(r, now)),
                    "steps": [
                        {
                            "step": s.step,
                            "state": s.state.value,
                            "idempotency_key": s.idempotency_key,
                            "attempts": s.attempts,
                            "origin": s.origin.value if s.origin else None,
                            "refs": s.refs,
                            "last_error": s.last_error,
                            "updated_at": s.updated_at.isoformat(),
                        }
                        for s in steps[r.id].values()
                    ],
                }
                for r in records
            ],
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return
    out = console()
    for rev in revisions:
        inv = documents[rev]
        out.print(
            f"{inv.number} revision {rev}: {inv.client_name} ({inv.client_id}), period "
            f"{inv.period}, issued {inv.issue_date}, due {inv.due_date}, "
            f"{money(inv.total_fee, inv.currency)} {inv.currency}, {len(inv.lines)} lines, "
            f"hash {inv.billing_hash()[:12]}",
            markup=False,
        )
    for r in records:
        out.print(
            f"\n{r.target} account {r.account}: {r.state.value}"
            f"{' (stuck: holder gone)' if _stuck(r, now) else ''}, {r.attempts} attempts, "
            f"revision {r.revision}, updated {r.updated_at:%Y-%m-%d %H:%M:%S} UTC",
            markup=False,
        )
        if r.last_error:
            out.print(f"  last error: {r.last_error}", markup=False)
        table = Table(show_edge=False)
        for column in ("Step", "State", "Origin", "Key", "Attempts", "Provider ids", "Error"):
            table.add_column(column)
        for s in steps[r.id].values():
            table.add_row(
                s.step,
                s.state.value,
                s.origin.value if s.origin else "",
                s.idempotency_key,
                str(s.attempts),
                plain(_refs(s.refs)),
                plain(s.last_error or ""),
            )
        out.print(table)
    if not records:
        out.print("no deliveries recorded", markup=False)


def run_adapters() -> None:
    """``kiki-billing adapters``: a table, then install commands ready to paste."""
    from rich.table import Table

    from kiki_billing.hub.registry import describe_adapters

    infos = describe_adapters()
    table = Table(title="Adapters (entry-point group kiki_billing.adapters)")
    for column in ("Name", "Provided by", "SDK", "Description"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            info.name,
            f"{info.distribution or '?'} ({info.value})",
            "present" if info.sdk_present else "missing",
            plain(info.load_error or info.description),
        )
    console().print(table)
    for info in infos:
        if info.install:
            console().print(f"{info.name}: {info.install}", markup=False, soft_wrap=True)


def _refs(refs: Mapping[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(refs.items()) if key != "sha256")
