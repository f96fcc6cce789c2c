"""Idempotency keys: the one place they are made.

A key is derived from (invoice number, revision, target, step) and nothing else, so every
retry, every re-run and every machine sends the same key for the same write.

WARNING: changing the derivation (or ``KEY_VERSION``) changes every key, and the providers will
then treat re-sent writes as new ones. Only ever add a new version for new deliveries.
"""

from __future__ import annotations

import hashlib

KEY_VERSION = "k1"
# NOTE: QuickBooks caps requestid at 50 characters (36 inside a batch); Xero's Idempotency-Key
# at 128, Stripe's at 255. "k1-" + 32 hex digits = 35 characters fits all of them.
KEY_LENGTH = 35


def idempotency_key(
    invoice_number: str, revision: int, target: str, step: str, generation: int = 0
) -> str:
    """The idempotency key of one write.

    Args:
        invoice_number: ``KIKI-OaaS-YYYYMM-NNNNNN``.
        revision: The invoice revision (0 for the first issue).
        target: The adapter name (``stripe``).
        step: The step name (``draft``, ``line-1``, ...).
        generation: 0, except when a step that failed terminally is re-driven after its cause
            was fixed: providers keep a failed result under its key (Stripe: a 500 for 24 h),
            so each re-drive gets the next generation (see :func:`step_generation`).

    Returns:
        ``k1-`` followed by 32 hex digits of SHA-256 over the parts.
    """
    parts = [KEY_VERSION, invoice_number, str(revision), target, step]
    if generation:
        parts.append(f"g{generation}")
    material = "\x1f".join(parts)
    return f"{KEY_VERSION}-{hashlib.sha256(material.encode()).hexdigest()[:32]}"
