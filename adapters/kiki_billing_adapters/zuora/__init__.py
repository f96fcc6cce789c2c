"""Zuora Billing over SOAP with ``zeep`` (``pip install 'kiki-billing[zuora]'``)."""

from .adapter import ZuoraAdapter
from .errors import ZuoraApiError, classify_zuora_error
from .settings import ZuoraClientSettings, ZuoraSettings
from .soap import DEFAULT_WSDL, SESSION_MASK, ZuoraWsdl, with_session
from .wire import (
    account_query,
    subscription_name,
    to_zuora_account,
    to_zuora_activation,
    to_zuora_contact,
    to_zuora_subscribe,
    zoql_literal,
    zuora_amount,
)

__all__ = [
    "DEFAULT_WSDL",
    "SESSION_MASK",
    "ZuoraAdapter",
    "ZuoraApiError",
    "ZuoraClientSettings",
    "ZuoraSettings",
    "ZuoraWsdl",
    "account_query",
    "classify_zuora_error",
    "subscription_name",
    "to_zuora_account",
    "to_zuora_activation",
    "to_zuora_contact",
    "to_zuora_subscribe",
    "with_session",
    "zoql_literal",
    "zuora_amount",
]
