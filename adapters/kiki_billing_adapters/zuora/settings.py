"""Zuora settings: ``KIKI_ZUORA_*`` variables and the ``[clients.zuora]`` table."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kiki_billing.plugin import (
    AdapterSettings,
    ClientSettings,
    SecretStr,
    check_api_base,
    check_secret,
)

ZUORA_ID_PATTERN = r"^(?:[A-Za-z0-9]{32}|\d+)$"
"""The WSDL's ``zns:ID`` simple type (``[a-zA-Z0-9]{32}|\\d+``)."""
# NOTE: Zuora's AccountNumber holds at most 70 characters (REST Account object, UNVERIFIED for
# SOAP); we also keep to the characters of our client ids, so no ZOQL escaping is ever needed.
ACCOUNT_NUMBER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,69}$"
DEFAULT_SESSION_LIFETIME = 900.0
"""Seconds a login session is used before logging in again (Zuora's default session timeout is
15 minutes; a tenant can change it under Security Policies)."""


class ZuoraSettings(AdapterSettings):
    """Zuora credentials, SOAP endpoint and WSDL, from ``KIKI_ZUORA_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="KIKI_ZUORA_", extra="ignore", frozen=True)

    username: SecretStr
    """``KIKI_ZUORA_USERNAME``: the API user's login name."""
    password: SecretStr
    """``KIKI_ZUORA_PASSWORD``."""
    api_base: str | None = None
    """``KIKI_ZUORA_API_BASE``: the SOAP endpoint (production, sandbox, EU, the tenant's own),
    e.g. ``https://apisandbox.zuora.com/apps/services/a/78.0``; default: the WSDL's
    ``soap:address``."""
    wsdl: str | None = None
    """``KIKI_ZUORA_WSDL``: the tenant's WSDL file (custom fields, its API version); default:
    the public 78.0 WSDL shipped with kiki-billing. Never fetched over the network."""
    session_lifetime: float = Field(default=DEFAULT_SESSION_LIFETIME, ge=60, le=86_400)
    """``KIKI_ZUORA_SESSION_LIFETIME``: seconds a session is used before logging in again."""

    @field_validator("username", "password")
    @classmethod
    def _check_credential(cls, value: SecretStr) -> SecretStr:
        return check_secret(value)

    @field_validator("api_base")
    @classmethod
    def _check_base(cls, value: str | None) -> str | None:
        return None if value is None else check_api_base(value)

    @field_validator("wsdl")
    @classmethod
    def _check_wsdl(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; unset it to use the WSDL shipped with kiki-billing")
        return value


class ZuoraClientSettings(ClientSettings):
    """``[clients.zuora]``: the client's Zuora account and the catalogue charge to bill with.

    ``product_rate_plan_id`` and ``product_rate_plan_charge_id`` name a one-time flat-fee
    charge of the tenant's catalogue (usually set once for every client in
    ``[targets.zuora]``); each invoice line becomes one instance of it at the line's fee.
    """

    account_number: str | None = Field(default=None, pattern=ACCOUNT_NUMBER_PATTERN)
    """The Zuora AccountNumber (default: the client id); found, or created."""
    product_rate_plan_id: str = Field(pattern=ZUORA_ID_PATTERN)
    product_rate_plan_charge_id: str = Field(pattern=ZUORA_ID_PATTERN)
    process_payments: bool = False
    """Collect at once with the account's default payment method (``ProcessPayments``)."""
