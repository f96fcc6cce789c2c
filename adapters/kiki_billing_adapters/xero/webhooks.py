"""Xero webhooks: the ``x-xero-signature`` check, intent to receive, and invoice events.

Pure functions (no I/O). An event names the invoice by id only: the hub reads it back through
the adapter to learn its payment state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from kiki_billing.plugin import WebhookEvent, WebhookRejected, hmac_sha256_matches

from .wire import INVOICE_ID

# NOTE: developer.xero.com "Configuring your server" / "Intent to receive": the payload hashed
# with HMAC-SHA256 under the webhook signing key, base64-encoded, is the `x-xero-signature`
# header; answer 200 (no body, no cookies, within 5 s) to a correctly signed payload and 401
# to an incorrectly signed one. Intent-to-receive requests are ordinary payloads with no
# events, so the same check answers them.
SIGNATURE_HEADER = "x-xero-signature"
UNAUTHORIZED = 401


def verify_xero_signature(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    """Check ``x-xero-signature`` (base64 HMAC-SHA256 of the raw body, webhook key).

    Raises:
        WebhookRejected: No header, or it does not match (401, as Xero expects).
    """
    header = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER), None)
    if not header:
        raise WebhookRejected("no x-xero-signature header", status=UNAUTHORIZED)
    if not hmac_sha256_matches(secret, body, header, encoding="base64"):
        raise WebhookRejected("the x-xero-signature does not match the body", status=UNAUTHORIZED)


def read_xero_events(body: bytes, account: str) -> list[WebhookEvent]:
    """A verified payload's events (none for an intent-to-receive request).

    Args:
        body: The raw body (xero-webhooks.yaml ``WebhookEvent``).
        account: The adapter's tenant id; events of another tenant keep their own.

    Raises:
        WebhookRejected: Not JSON, or no ``events`` list (400).
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejected("the body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise WebhookRejected("the body is not a Xero webhook payload")
    events = []
    for item in data["events"]:
        if not isinstance(item, dict):
            raise WebhookRejected("an events item is not an object")
        resource = str(item.get("resourceId") or "")
        category = str(item.get("eventCategory") or "")
        kind = str(item.get("eventType") or "")
        when = str(item.get("eventDateUtc") or "")
        tenant = str(item.get("tenantId") or "").lower()
        # NOTE: Xero's events carry no id: the resource, the change and its time identify one.
        event_id = f"{category}:{resource}:{kind}:{when}"
        event_type = f"{category}.{kind}"
        owner = account if tenant == account.lower() else f"tenant:{tenant}"
        if category != "INVOICE" or not resource:
            events.append(WebhookEvent(event_id, event_type, {}, account=owner))
            continue
        events.append(
            WebhookEvent(
                event_id=event_id,
                event_type=event_type,
                refs={INVOICE_ID: resource},
                occurred_at=_when(when),
                account=owner,
            )
        )
    return events


def _when(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    # NOTE: eventDateUtc is UTC without an offset (2024-06-21T01:15:39.902).
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
