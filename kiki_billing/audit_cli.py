"""``kiki-billing audit``: verify a hash-chained audit trail and append events to it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kiki_billing.cli_support import console, reported_errors
from kiki_billing.errors import InputError

if TYPE_CHECKING:
    from kiki_billing.sources.audit_trail import AuditEvent

audit_app = typer.Typer(
    name="audit",
    help="Verify a hash-chained audit trail of spend and LTV events, or append events to it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EVENT_COLUMNS = ("timestamp", "client_id", "campaign_id", "metric", "amount")
OPTIONAL_EVENT_COLUMNS = ("campaign_name", "platform")


@audit_app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="The audit trail (CSV).", dir_okay=False)],
) -> None:
    """Verify the whole hash chain; a broken chain names its first bad record (exit 2)."""
    with reported_errors():
        from kiki_billing.sources.audit_trail import verify_audit_trail

        summary = verify_audit_trail(file)
        console().print(
            f"{file}: {summary.records} records, chain intact, head {summary.head}",
            markup=False,
            soft_wrap=True,
        )


@audit_app.command()
def append(
    file: Annotated[
        Path, typer.Argument(help="The audit trail; created if absent.", dir_okay=False)
    ],
    client: Annotated[str | None, typer.Option("--client", help="Client id.")] = None,
    campaign: Annotated[str | None, typer.Option("--campaign", help="Campaign id.")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="spend or ltv.")] = None,
    amount: Annotated[
        str | None, typer.Option("--amount", help="Decimal amount in the major unit, e.g. 123.45.")
    ] = None,
    timestamp: Annotated[
        str | None,
        typer.Option("--timestamp", help="ISO 8601 with a time zone (default: now, UTC)."),
    ] = None,
    campaign_name: Annotated[
        str | None, typer.Option("--campaign-name", help="Campaign name (optional).")
    ] = None,
    platform: Annotated[
        str | None, typer.Option("--platform", help="Ad platform (optional).")
    ] = None,
    from_csv: Annotated[
        Path | None,
        typer.Option(
            "--from-csv",
            help="Append every event of this CSV (columns timestamp, client_id, campaign_id, "
            "metric, amount[, campaign_name, platform]); one bad row and nothing is appended.",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Append one event (or every event of --from-csv) and print the new chain head."""
    with reported_errors():
        from kiki_billing.money import parse_amount
        from kiki_billing.sources.audit_trail import AuditEvent, append_audit_events

        single = {
            "--client": client,
            "--campaign": campaign,
            "--metric": metric,
            "--amount": amount,
            "--timestamp": timestamp,
            "--campaign-name": campaign_name,
            "--platform": platform,
        }
        if from_csv is not None:
            given = [name for name, value in single.items() if value is not None]
            if given:
                raise InputError(f"--from-csv cannot be combined with {', '.join(given)}")
            events = read_events_csv(from_csv)
        elif client is None or campaign is None or metric is None or amount is None:
            missing = [name for name, value in list(single.items())[:4] if value is None]
            raise InputError(f"{', '.join(missing)} required (or give --from-csv EVENTS.csv)")
        else:
            events = [
                AuditEvent(
                    timestamp=datetime.now(UTC)
                    if timestamp is None
                    else parse_timestamp(timestamp),
                    client_id=client,
                    campaign_id=campaign,
                    metric=metric,
                    amount=parse_amount(amount, field="amount"),
                    campaign_name=campaign_name or "",
                    platform=platform or "",
                )
            ]
        head = append_audit_events(file, events)
        console().print(head, markup=False, soft_wrap=True)


def parse_timestamp(text: str, *, field: str = "timestamp") -> datetime:
    """Parse an ISO 8601 timestamp that carries a time zone (``Z`` or ``+HH:MM``).

    Raises:
        InputError: Not ISO 8601, or no time zone.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"not an ISO 8601 timestamp: {text!r}", field=field) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InputError(
            f"timestamp {text!r} has no time zone (add Z or +HH:MM)", field=field
        ) from None
    return moment


def read_events_csv(path: Path) -> list[AuditEvent]:
    """Read and validate every event of an events CSV file.

    Args:
        path: CSV with the columns ``timestamp, client_id, campaign_id, metric, amount`` and
            optionally ``campaign_name, platform``.

    Returns:
        The events, in file order.

    Raises:
        InputError: Unreadable file, a missing or unknown column, or a bad value; names the
            file, the row (the header is row 1) and the field.
    """
    import csv

    from kiki_billing.money import parse_amount
    from kiki_billing.sources.audit_trail import AuditEvent
    from kiki_billing.sources.base import csv_table, decode_utf8, read_bytes

    where = str(path)
    text = decode_utf8(read_bytes(path), path)
    reader = csv_table(text, where, EVENT_COLUMNS, EVENT_COLUMNS + OPTIONAL_EVENT_COLUMNS)
    events: list[AuditEvent] = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row:
                raise InputError("more values than columns", file=where, row=line)
            values = {name: (value or "").strip() for name, value in row.items()}
            for column in EVENT_COLUMNS:
                if not values[column]:
                    raise InputError("value is empty", file=where, row=line, field=column)
            try:
                events.append(
                    AuditEvent(
                        timestamp=parse_timestamp(values["timestamp"]),
                        client_id=values["client_id"],
                        campaign_id=values["campaign_id"],
                        metric=values["metric"],
                        amount=parse_amount(values["amount"], field="amount"),
                        campaign_name=values.get("campaign_name", ""),
                        platform=values.get("platform", ""),
                    )
                )
            except InputError as exc:
                raise exc.located(file=where, row=line) from None
    except csv.Error as exc:
        raise InputError(f"malformed CSV: {exc}", file=where, row=reader.line_num) from None
    return events
