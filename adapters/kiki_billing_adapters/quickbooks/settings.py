"""QuickBooks Online settings: ``KIKI_QUICKBOOKS_*`` variables and ``[clients.quickbooks]``."""

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

Environment = Literal["sandbox", "production"]

# NOTE: Intuit's published endpoints (developer.intuit.com, OAuth 2.0 and "Base URLs"); the
# discovery document (intuitlib's default source) names the same, but is never fetched here.
API_BASES: dict[str, str] = {
    "production": "https://quickbooks.api.intuit.com/v3",
    "sandbox": "https://sandbox-quickbooks.api.intuit.com/v3",
}
TOKEN_URL = "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"  # noqa: S105 (a URL)
AUTHORIZATION_URL = "https://appcenter.intuit.com/connect/oauth2"
REVOKE_URL = "https://developer.api.intuit.com/v2/oauth2/tokens/revoke"
MINOR_VERSION = 75
"""python-quickbooks 0.9.12's minimum; Intuit retired older minor versions in 2025."""
DEFAULT_ITEM = "Profit share"
"""The service item's name; the QuickBooks CSV export's default item too."""
# NOTE: Item.Name is at most 100 characters in QBO (Finance.xsd, Item/Name documentation), and
# names of list entities must not contain ':' (it separates the levels of FullyQualifiedName).
MAX_ITEM_NAME = 100


class QuickBooksSettings(AdapterSettings):
    """QuickBooks Online app credentials, company and endpoints, from ``KIKI_QUICKBOOKS_*``."""

    model_config = SettingsConfigDict(env_prefix="KIKI_QUICKBOOKS_", extra="ignore", frozen=True)

    client_id: SecretStr
    """``KIKI_QUICKBOOKS_CLIENT_ID``: the app's client id (Keys & credentials)."""
    client_secret: SecretStr
    """``KIKI_QUICKBOOKS_CLIENT_SECRET``."""
    realm_id: str = Field(pattern=r"^[0-9]{1,32}$")
    """``KIKI_QUICKBOOKS_REALM_ID``: the company (realm) id, digits only."""
    refresh_token: SecretStr | None = None
    """``KIKI_QUICKBOOKS_REFRESH_TOKEN``: the first refresh token; the rotated ones are kept in
    the ledger database. Optional once ``complete_authorization`` (``kiki-billing connect``)
    stored one; setting a different value later starts again from it."""
    environment: Environment = "production"
    """``KIKI_QUICKBOOKS_ENVIRONMENT``: ``sandbox`` or ``production``."""
    api_base: str | None = None
    """``KIKI_QUICKBOOKS_API_BASE``: default Intuit's ``.../v3`` for the environment."""
    token_url: str = TOKEN_URL
    """``KIKI_QUICKBOOKS_TOKEN_URL``: Intuit's bearer-token endpoint by default."""
    income_account: str | None = Field(default=None, min_length=1, max_length=100)
    """``KIKI_QUICKBOOKS_INCOME_ACCOUNT``: name or Id of the service item's income account;
    default: the first active account of type Income."""
    webhook_secret: SecretStr | None = None
    """``KIKI_QUICKBOOKS_WEBHOOK_SECRET``: the app's webhooks Verifier Token, for
    ``kiki-billing webhooks serve``."""

    @field_validator("client_id", "client_secret", "refresh_token", "webhook_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else check_secret(value)

    @field_validator("environment", mode="before")
    @classmethod
    def _lower_environment(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("api_base", "token_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else check_api_base(value)

    @field_validator("income_account")
    @classmethod
    def _check_income_account(cls, value: str | None) -> str | None:
        if value is not None and (value != value.strip() or any(ord(c) < 32 for c in value)):
            raise ValueError("has surrounding whitespace or a control character")
        return value

    @property
    def base_url(self) -> str:
        """The API base (``.../v3``) actually used."""
        return self.api_base or API_BASES[self.environment]

    @property
    def account_id(self) -> str:
        """``sandbox:<realm>`` / ``production:<realm>``: no secret."""
        return f"{self.environment}:{self.realm_id}"

    def seed_fingerprint(self) -> str:
        """A digest of ``KIKI_QUICKBOOKS_REFRESH_TOKEN`` (never the token), or ``""``."""
        if self.refresh_token is None:
            return ""
        digest = hashlib.sha256(self.refresh_token.get_secret_value().encode()).hexdigest()
        return "sha256:" + digest[:16]


class QuickBooksClientSettings(ClientSettings):
    """``[clients.quickbooks]``: an existing customer, the item and tax code, and sending.

    ``customer``: the Id of an existing QuickBooks customer (default: found by DisplayName =
    the client's name, else created). ``item``: the service item's name (also read from
    ``[exports.quickbooks]``). ``tax_code``: a TaxCode Id put on every line (needed by
    companies outside the US; ``NON`` in US companies). ``send``: email the invoice from
    QuickBooks once created.
    """

    customer: str | None = Field(default=None, pattern=r"^[0-9]{1,32}$")
    item: str = Field(default=DEFAULT_ITEM, min_length=1, max_length=MAX_ITEM_NAME)
    tax_code: str | None = Field(default=None, pattern=r"^[A-Za-z0-9]{1,32}$")
    send: bool = False

    @field_validator("item")
    @classmethod
    def _check_item(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("must not contain ':' (QuickBooks separates sub-items with it)")
        return value
