"""The delivery ledger: schema and migrations, process ownership, and the store."""

# The payment, webhook-event, invoice-terms and account-health tables join the schema's
# metadata on import, before any ledger is opened.
from kiki_billing.hub.ledger import payments as payments
from kiki_billing.hub.ledger.ownership import owner_is_dead, process_owner, worker_owner
from kiki_billing.hub.ledger.schema import SCHEMA_VERSION, DeliveryState, StepOrigin
from kiki_billing.hub.ledger.store import (
    DeliveryRecord,
    InvoiceConflictError,
    Ledger,
    OpenedDelivery,
    StepRecord,
    StepWrite,
    conflict_message,
    default_ledger_url,
)

__all__ = [
    "SCHEMA_VERSION",
    "DeliveryRecord",
    "DeliveryState",
    "InvoiceConflictError",
    "Ledger",
    "OpenedDelivery",
    "StepOrigin",
    "StepRecord",
    "StepWrite",
    "conflict_message",
    "default_ledger_url",
    "owner_is_dead",
    "process_owner",
    "worker_owner",
]
