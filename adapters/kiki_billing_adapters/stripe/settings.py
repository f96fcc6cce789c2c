"""Stripe settings: ``KIKI_STRIPE_*`` variables and the ``[clients.stripe]`` table."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kiki_billing.plugin import (
    AdapterSettings,
    ClientSettings,
    SecretStr,
    check_api_base,
    check_secret,
)

API_VERSION = "2023-08-16"
"""The Stripe API version we send and check our requests against (specs/stripe, 2023-08-16)."""

Collection = Literal["auto", "now", "send_invoice"]


class StripeSettings(AdapterSettings):
    """Stripe credentials and endpoint, from ``KIKI_STRIPE_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="KIKI_STRIPE_", extra="ignore", frozen=True)

    api_key: SecretStr
    """``KIKI_STRIPE_API_KEY``: a secret or restricted key (``sk_test_...``, ``rk_live_...``)."""
    api_base: str = "https://api.stripe.com"
    """``KIKI_STRIPE_API_BASE``; a local fake in tests."""
    api_version: str = API_VERSION
    """Pinned: our requests are checked against the spec of this version."""
    account: str | None = Field(default=None, pattern=r"^acct_[A-Za-z0-9]{1,64}$")
    """``KIKI_STRIPE_ACCOUNT``: the Stripe account id (``acct_...``), to keep the ledger's
    account the same when the key is rotated; default: the key's mode and fingerprint."""
    webhook_secret: SecretStr | None = None
    """``KIKI_STRIPE_WEBHOOK_SECRET``: the webhook endpoint's signing secret (``whsec_...``),
    for ``kiki-billing webhooks serve``."""

    @field_validator("api_key")
    @classmethod
    def _check_key(cls, value: SecretStr) -> SecretStr:
        check_secret(value)
        secret = value.get_secret_value()
        # NOTE: publishable keys (pk_) cannot create invoices; secret (sk_) and restricted
        # (rk_) keys can (stripe.com/docs/keys).
        if secret.startswith("pk_"):
            raise ValueError("is a publishable key (pk_...); a secret key (sk_...) is needed")
        if not secret.startswith(("sk_test_", "sk_live_", "rk_test_", "rk_live_")):
            raise ValueError("is not a Stripe secret or restricted key (sk_... or rk_...)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else check_secret(value)

    @field_validator("api_base")
    @classmethod
    def _check_base(cls, value: str) -> str:
        return check_api_base(value)

    @property
    def test_mode(self) -> bool:
        """Whether the key is a test-mode key (``sk_test_``/``rk_test_``)."""
        return self.api_key.get_secret_value().startswith(("sk_test_", "rk_test_"))

    @property
    def account_id(self) -> str:
        """``test:``/``live:`` plus the account id, or a SHA-256 prefix of the key (never it)."""
        mode = "test" if self.test_mode else "live"
        if self.account:
            return f"{mode}:{self.account}"
        digest = hashlib.sha256(self.api_key.get_secret_value().encode()).hexdigest()[:12]
        # NOTE: the form of earlier ledgers ("test:" + 12 hex digits), so they keep matching.
        return f"{mode}:{digest}"


class StripeClientSettings(ClientSettings):
    """``[clients.stripe]``: an existing customer and how the invoice is collected.

    ``collection``: ``auto`` lets Stripe charge and retry by itself after finalizing; ``now``
    charges the customer's default payment method at once; ``send_invoice`` emails the invoice
    (due after the contract's payment terms).
    """

    customer: str | None = Field(default=None, pattern=r"^cus_[A-Za-z0-9]+$", max_length=255)
    collection: Collection = "auto"
