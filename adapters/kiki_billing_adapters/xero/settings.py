"""Xero settings: ``KIKI_XERO_*`` variables and the ``[clients.xero]`` table."""

from __future__ import annotations

import hashlib
import re
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

API_BASE = "https://api.xero.com/api.xro/2.0"
TOKEN_URL = "https://identity.xero.com/connect/token"  # noqa: S105 - a URL, not a secret
AUTHORIZE_URL = "https://login.xero.com/identity/connect/authorize"

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# NOTE: Xero client ids are 32 upper-case hex characters (developer.xero.com "My Apps"); any
# short run of letters and digits is accepted so a test app's id works too.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{8,128}$")


class XeroSettings(AdapterSettings):
    """Xero OAuth 2.0 app, organisation and endpoints, from ``KIKI_XERO_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="KIKI_XERO_", extra="ignore", frozen=True)

    client_id: str
    """``KIKI_XERO_CLIENT_ID``: the OAuth 2.0 app's client id (not a secret)."""
    client_secret: SecretStr
    """``KIKI_XERO_CLIENT_SECRET``."""
    refresh_token: SecretStr | None = None
    """``KIKI_XERO_REFRESH_TOKEN``: the first refresh token; afterwards the rotated ones live in
    the ledger database. Not needed once ``kiki-billing connect xero`` stored one."""
    tenant_id: str
    """``KIKI_XERO_TENANT_ID``: the organisation (``xero-tenant-id``)."""
    api_base: str = API_BASE
    """``KIKI_XERO_API_BASE``; a local fake in tests."""
    token_url: str = TOKEN_URL
    """``KIKI_XERO_TOKEN_URL``: Xero's identity token endpoint."""
    webhook_secret: SecretStr | None = None
    """``KIKI_XERO_WEBHOOK_SECRET``: the app's webhook signing key, for
    ``kiki-billing webhooks serve``."""

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, value: str) -> str:
        if not _CLIENT_ID.fullmatch(value):
            raise ValueError("is not a Xero client id (letters and digits, as in My Apps)")
        return value

    @field_validator("client_secret")
    @classmethod
    def _check_client_secret(cls, value: SecretStr) -> SecretStr:
        return check_secret(value)

    @field_validator("refresh_token", "webhook_secret")
    @classmethod
    def _check_refresh_token(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else check_secret(value)

    @field_validator("tenant_id")
    @classmethod
    def _check_tenant(cls, value: str) -> str:
        if not _UUID.fullmatch(value):
            raise ValueError(
                "is not a Xero tenant id (a UUID; `kiki-billing connect xero` lists the "
                "organisations a connection reaches)"
            )
        return value.lower()

    @field_validator("api_base", "token_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_api_base(value)

    @property
    def connections_url(self) -> str:
        """``GET /connections`` on the API's host (``https://api.xero.com/connections``)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.api_base)
        return f"{parts.scheme}://{parts.netloc}/connections"

    @property
    def seed_fingerprint(self) -> str:
        """A digest of ``KIKI_XERO_REFRESH_TOKEN`` (never the token): tells a new seed apart."""
        if self.refresh_token is None:
            return ""
        secret = self.refresh_token.get_secret_value()
        return hashlib.sha256(secret.encode()).hexdigest()[:16]


XeroStatus = Literal["AUTHORISED", "DRAFT"]
LineAmountTypes = Literal["Exclusive", "Inclusive", "NoTax"]

# NOTE: TaxType takes the code of a tax rate (NONE, OUTPUT, EXEMPTOUTPUT, TAX001, ...; GET
# /TaxRates), not the display name ("Tax Exempt") that the CSV import takes.
_TAX_TYPE = r"^[A-Z0-9_]{1,50}$"


class XeroClientSettings(ClientSettings):
    """``[clients.xero]`` (defaults from ``[exports.xero]`` and ``[targets.xero]``).

    ``contact_id``: an existing Xero contact to bill (else the contact whose ``ContactNumber``
    is the client id, created when missing). ``status``: ``AUTHORISED`` (approved, awaiting
    payment) or ``DRAFT`` (left for review in Xero).
    """

    contact_id: str | None = Field(default=None, pattern=_UUID.pattern)
    account_code: str = Field(default="200", min_length=1, max_length=10)
    tax_type: str | None = None
    line_amount_types: LineAmountTypes = "Exclusive"
    status: XeroStatus = "AUTHORISED"
    branding_theme_id: str | None = Field(default=None, pattern=_UUID.pattern)

    @field_validator("tax_type")
    @classmethod
    def _check_tax_type(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_TAX_TYPE, value):
            raise ValueError(
                "must be a Xero TaxType code such as NONE, OUTPUT or TAX001 (GET /TaxRates), "
                "not a tax rate's display name as the CSV import takes; set tax_type in "
                "[targets.xero] to override [exports.xero]"
            )
        return value
