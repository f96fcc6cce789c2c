"""QuickBooks Online webhooks: the ``intuit-signature`` check and invoice change notifications.

Pure functions (no I/O). A notification names entities by id only: the hub reads a changed
invoice back through the adapter to learn its payment state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from kiki_billing.plugin import PaymentState, WebhookEvent, WebhookRejected, hmac_sha256_matches

from .wire import INVOICE_ID

# NOTE: developer.intuit.com "Managing webhooks notifications", Validating the notification:
# hash the payload with HMAC-SHA256 using the app's Verifier Token as the key; the
# `intuit-signature` header holds that hash base64-encoded.
SIGNATURE_HEADER = "intuit-signature"


def verify_quickbooks_signature(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    """Check ``intuit-signature`` (base64 HMAC-SHA256 of the raw body, Verifier Token key).

    Raises:
        WebhookRejected: No header, or it does not match (400).
    """
    header = next((v for k, v in headers.items() if k.lower() == SIGNATURE_HEADER), None)
    if not header:
        raise WebhookRejected("no intuit-signature header")
    if not hmac_sha256_matches(secret, body, header, encoding="base64"):
        raise WebhookRejected("the intuit-signature does not match the body")


def read_quickbooks_events(body: bytes, accounts: Mapping[str, str]) -> list[WebhookEvent]:
    """A verified notification's entity changes as :class:`WebhookEvent` s.

    Both payload formats are read: the ``eventNotifications`` one, and the CloudEvents array
    Intuit moved webhooks to (blogs.a.intuit.com, 2025-11-12, "Upcoming change to webhooks
    payload structure"; mandatory from 2026-05-15).

    Args:
        body: The raw body.
        accounts: Realm id -> the adapter's account for it (other realms are another account).

    Raises:
        WebhookRejected: Not JSON, or neither format (400).
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejected("the body is not JSON") from None
    if isinstance(data, dict) and isinstance(data.get("eventNotifications"), list):
        changes = list(_legacy_changes(data["eventNotifications"]))
    elif isinstance(data, list):
        changes = list(_cloudevent_changes(data))
    else:
        raise WebhookRejected("the body is not a QuickBooks webhook notification")
    events = []
    for event_id, realm, entity, operation, entity_id, when in changes:
        event_type = f"{entity}.{operation}"
        account = accounts.get(realm, f"realm:{realm}")
        if entity.lower() != "invoice" or not entity_id:
            events.append(WebhookEvent(event_id, event_type, {}, account=account))
            continue
        events.append(
            WebhookEvent(
                event_id=event_id,
                event_type=event_type,
                refs={INVOICE_ID: entity_id},
                # NOTE: a deleted invoice cannot be read back; it no longer claims payment.
                state=PaymentState.VOID if operation.lower() in ("delete", "deleted") else None,
                occurred_at=_when(when),
                account=account,
            )
        )
    return events


Change = tuple[str, str, str, str, str, str]
"""``(event id, realm, entity, operation, entity id, time)``."""


def _legacy_changes(notifications: list[Any]) -> Iterator[Change]:
    for notification in notifications:
        if not isinstance(notification, dict):
            raise WebhookRejected("an eventNotifications item is not an object")
        realm = str(notification.get("realmId") or "")
        change = notification.get("dataChangeEvent") or {}
        entities = change.get("entities") if isinstance(change, dict) else None
        if not realm or not isinstance(entities, list):
            raise WebhookRejected("an eventNotifications item has no realmId or entities")
        for entity in entities:
            if not isinstance(entity, dict):
                raise WebhookRejected("an entities item is not an object")
            name, ident = str(entity.get("name") or ""), str(entity.get("id") or "")
            operation, when = (
                str(entity.get("operation") or ""),
                str(entity.get("lastUpdated") or ""),
            )
            # NOTE: this format carries no event id: the change itself (realm, entity, id,
            # operation, time) identifies it, so a resend of the same change is a replay.
            event_id = f"{realm}:{name}:{ident}:{operation}:{when}"
            yield event_id, realm, name, operation, ident, when


def _cloudevent_changes(items: list[Any]) -> Iterator[Change]:
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise WebhookRejected("a CloudEvents item has no id")
        # NOTE: "type" reads qbo.<entity>.<action>.v<n> (qbo.invoice.updated.v1).
        parts = str(item.get("type") or "").split(".")
        entity = parts[1] if len(parts) >= 3 else ""
        action = parts[2] if len(parts) >= 3 else ""
        yield (
            item["id"],
            str(item.get("intuitaccountid") or ""),
            entity,
            action,
            str(item.get("intuitentityid") or ""),
            str(item.get("time") or ""),
        )


def _when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
