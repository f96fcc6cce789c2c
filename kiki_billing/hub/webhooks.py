"""The webhook receiver: an ASGI app (Starlette) that ``kiki-billing webhooks serve`` runs.

``POST /webhooks/<target>`` takes one provider's webhook: the raw body (at most
``max_body_bytes``) and its headers go to the adapter's
:meth:`~kiki_billing.plugin.WebhookSource.webhook_events`, which verifies the provider's
signature with ``KIKI_<TARGET>_WEBHOOK_SECRET`` before reading anything. Then each event is
applied to the ledger (:func:`~kiki_billing.hub.payments.process_event`).

Answers, as the providers expect them:

- 200 with an empty body: verified and handled, including events that change nothing (a
  replay, an event type or invoice we do not know: each is logged);
- what the adapter's :class:`~kiki_billing.plugin.WebhookRejected` says (400; Xero: 401) for a
  bad signature, a stale timestamp, a tampered or unreadable body; nothing is recorded;
- 413 for a body over the cap, 404 for a target that is not configured, 405 for another verb;
- 503 when an invoice could not be read back from the provider, so that it sends the event
  again (the events applied before stay applied; a resend finds them replayed).

``GET /healthz`` answers 200 while the ledger answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from kiki_billing.hub.ledger import Ledger
from kiki_billing.hub.payments import Call, EventOutcome, direct_call, process_event
from kiki_billing.plugin import BillingAdapter, DeliveryError, WebhookRejected, WebhookSource

log = structlog.get_logger("kiki_billing.webhooks")

DEFAULT_MAX_BODY = 1_048_576
"""Bytes; QuickBooks notes that 2 MB is a common server limit, its notifications are small."""


@dataclass(frozen=True)
class Receiver:
    """One provider's webhook endpoint: its configured adapter and signing secret."""

    adapter: BillingAdapter[Any, Any]
    secret: str


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    ledger: Ledger,
    receivers: Mapping[str, Receiver],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    call: Call[Any] = direct_call,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Starlette:
    """The ASGI app that receives the configured providers' webhooks.

    Args:
        ledger: The ledger the payment states go to.
        receivers: Target name -> its adapter (a :class:`WebhookSource`) and secret.
        max_body_bytes: Bodies over this are refused with 413 before being read whole.
        call: Runs one provider read (the hub's limiter and retry policy).
        clock: The current time, for signature timestamps (tests).
    """

    def handle(target: str, headers: dict[str, str], body: bytes) -> Response:
        receiver = receivers[target]
        adapter = receiver.adapter
        assert isinstance(adapter, WebhookSource)
        bound = log.bind(target=target, account=adapter.account)
        try:
            events = adapter.webhook_events(headers, body, receiver.secret, clock())
        except WebhookRejected as exc:
            bound.warning("webhook.rejected", status=exc.status, reason=str(exc))
            # NOTE: Xero wants no body in any answer (developer.xero.com "Configuring your
            # server"); the reason is logged instead.
            return Response(status_code=exc.status)
        if not events:
            bound.info("webhook.received", events=0)
        for event in events:
            try:
                done: EventOutcome = process_event(ledger, adapter, event, call)
            except DeliveryError as exc:
                bound.warning(
                    "webhook.read_back_failed",
                    event_id=event.event_id,
                    event_type=event.event_type,
                    error=str(exc.scrubbed(adapter.secrets())),
                )
                return Response(status_code=503)
            bound.info(
                "webhook.event",
                event_id=done.event_id,
                event_type=done.event_type,
                outcome=done.outcome,
                invoice=done.invoice,
                state=done.state.value if done.state else None,
                reason=done.reason,
            )
        return Response(status_code=200)

    async def webhook(request: Request) -> Response:
        target = request.path_params["target"]
        if target not in receivers:
            return PlainTextResponse("no webhook receiver for this target\n", status_code=404)
        try:
            body = await _read_body(request, max_body_bytes)
        except _TooLarge:
            log.warning("webhook.rejected", target=target, status=413, reason="body too large")
            return PlainTextResponse("body too large\n", status_code=413)
        headers = {key.lower(): value for key, value in request.headers.items()}
        return await run_in_threadpool(handle, target, headers, body)

    async def healthz(_request: Request) -> Response:
        def ping() -> None:
            with ledger.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))

        try:
            await run_in_threadpool(ping)
        except Exception:
            return PlainTextResponse("ledger unavailable\n", status_code=503)
        return PlainTextResponse("ok\n")

    return Starlette(
        routes=[
            Route("/webhooks/{target}", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
        ]
    )
