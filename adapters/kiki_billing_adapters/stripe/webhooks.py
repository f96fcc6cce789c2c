"""Stripe webhooks: the ``Stripe-Signature`` check and invoice events as payment states.

Pure functions (no I/O), tested without a server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kiki_billing.plugin import PaymentState, WebhookEvent, WebhookRejected, hmac_sha256_matches

from .wire import CUSTOMER_ID, INVOICE_ID, from_stripe_amount, stripe_payment_state

# NOTE: Stripe's scheme (docs.stripe.com/webhooks "Verify signatures manually"; stripe-python
# `WebhookSignature`): `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=...][,v0=...]`; v1 is
# HMAC-SHA256 with the endpoint's signing secret over "<t>.<raw body>"; any v1 may match (a
# rolled secret sends two); other schemes are ignored; the libraries' default tolerance is
# 300 s, measured back from now.
SIGNATURE_HEADER = "stripe-signature"
SCHEME = "v1"
TOLERANCE_SECONDS = 300


def verify_stripe_signature(
    headers: Mapping[str, str], body: bytes, secret: str, now: datetime
) -> None:
    """Check a webhook's ``Stripe-Signature`` against its raw body.

    Raises:
        WebhookRejected: No or a malformed header, no matching ``v1`` signature, or a
            timestamp older than 300 s (400, as Stripe expects for a refused event).
    """
    header = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER), None)
    if not header:
        raise WebhookRejected("no Stripe-Signature header")
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamps.append(value)
        elif key == SCHEME:
            signatures.append(value)
    if len(timestamps) != 1 or not timestamps[0].isdigit():
        raise WebhookRejected("the Stripe-Signature header has no timestamp")
    if not signatures:
        raise WebhookRejected(f"the Stripe-Signature header has no {SCHEME} signature")
    signed = timestamps[0].encode() + b"." + body
    if not any(hmac_sha256_matches(secret, signed, s, encoding="hex") for s in signatures):
        raise WebhookRejected("the Stripe signature does not match the body")
    age = now.timestamp() - int(timestamps[0])
    if age > TOLERANCE_SECONDS:
        raise WebhookRejected(
            f"the Stripe signature's timestamp is {int(age)} s old (tolerance "
            f"{TOLERANCE_SECONDS} s): a replayed or delayed request"
        )


def read_stripe_event(body: bytes) -> WebhookEvent:
    """A verified body as a :class:`WebhookEvent` (empty refs unless it is about an invoice).

    Raises:
        WebhookRejected: Not JSON, or not a Stripe event (400).
    """
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejected("the body is not JSON") from None
    if (
        not isinstance(event, dict)
        or event.get("object") != "event"
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
    ):
        raise WebhookRejected("the body is not a Stripe event")
    created = event.get("created")
    occurred = datetime.fromtimestamp(created, UTC) if isinstance(created, int) else None
    data = event.get("data")
    found = data.get("object") if isinstance(data, dict) else None
    if not isinstance(found, dict) or found.get("object") != "invoice" or not found.get("id"):
        return WebhookEvent(event["id"], event["type"], {}, occurred_at=occurred)
    return WebhookEvent(
        event_id=event["id"],
        event_type=event["type"],
        refs=_refs(found),
        state=_state(found),
        kiki_number=_metadata(found).get("kiki_invoice_number"),
        kiki_revision=_revision(found),
        occurred_at=occurred,
        amount_paid=_amount_paid(found),
    )


def _metadata(found: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = found.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _revision(found: Mapping[str, Any]) -> int | None:
    text = str(_metadata(found).get("kiki_revision") or "")
    return int(text) if text.isdigit() else None


def _refs(found: Mapping[str, Any]) -> dict[str, str]:
    refs = {INVOICE_ID: str(found["id"])}
    customer = found.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    if isinstance(customer, str) and customer:
        refs[CUSTOMER_ID] = customer
    return refs


def _state(found: Mapping[str, Any]) -> PaymentState | None:
    # NOTE: the event's invoice is the object as it was when the event happened (Stripe's
    # events carry a snapshot), so its status gives the state; an unknown status reads the
    # invoice back instead.
    try:
        return stripe_payment_state(found)
    except ValueError:
        return None


def _amount_paid(found: Mapping[str, Any]) -> Decimal | None:
    currency, paid = found.get("currency"), found.get("amount_paid")
    if not isinstance(currency, str) or not isinstance(paid, int):
        return None
    return from_stripe_amount(paid, currency.upper())
