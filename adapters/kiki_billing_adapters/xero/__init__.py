"""Xero Accounting API over plain HTTP (``pip install 'kiki-billing[xero]'``)."""

from .adapter import SCOPES, XeroAdapter
from .errors import XeroHTTPError, classify_xero_error
from .settings import API_BASE, AUTHORIZE_URL, TOKEN_URL, XeroClientSettings, XeroSettings
from .tokens import XeroTokens
from .wire import (
    encode_json,
    to_xero_contact,
    to_xero_invoice,
    to_xero_line_item,
    xero_amount,
    xero_invoice_number,
)

__all__ = [
    "API_BASE",
    "AUTHORIZE_URL",
    "SCOPES",
    "TOKEN_URL",
    "XeroAdapter",
    "XeroClientSettings",
    "XeroHTTPError",
    "XeroSettings",
    "XeroTokens",
    "classify_xero_error",
    "encode_json",
    "to_xero_contact",
    "to_xero_invoice",
    "to_xero_line_item",
    "xero_amount",
    "xero_invoice_number",
]
