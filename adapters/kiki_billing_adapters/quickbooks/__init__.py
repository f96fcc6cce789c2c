"""QuickBooks Online: python-quickbooks + intuit-oauth (extra `kiki-billing[quickbooks]`)."""

from .adapter import QuickBooksAdapter
from .errors import IntuitFault, classify_quickbooks_error, parse_fault
from .oauth import SCOPE, TokenKeeper
from .settings import (
    API_BASES,
    AUTHORIZATION_URL,
    MINOR_VERSION,
    TOKEN_URL,
    QuickBooksClientSettings,
    QuickBooksSettings,
)
from .wire import (
    doc_number,
    line_amount,
    private_note,
    qbo_amount,
    to_json_text,
    to_qbo_customer,
    to_qbo_invoice,
    to_qbo_item,
)

__all__ = [
    "API_BASES",
    "AUTHORIZATION_URL",
    "MINOR_VERSION",
    "SCOPE",
    "TOKEN_URL",
    "IntuitFault",
    "QuickBooksAdapter",
    "QuickBooksClientSettings",
    "QuickBooksSettings",
    "TokenKeeper",
    "classify_quickbooks_error",
    "doc_number",
    "line_amount",
    "parse_fault",
    "private_note",
    "qbo_amount",
    "to_json_text",
    "to_qbo_customer",
    "to_qbo_invoice",
    "to_qbo_item",
]
