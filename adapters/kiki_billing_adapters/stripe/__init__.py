"""Stripe Invoicing over the ``stripe`` SDK (``pip install 'kiki-billing[stripe]'``)."""

from .adapter import StripeAdapter
from .errors import classify_stripe_error
from .settings import API_VERSION, StripeClientSettings, StripeSettings
from .wire import (
    invoice_total_minor,
    stripe_amount,
    to_stripe_customer,
    to_stripe_finalize,
    to_stripe_invoice,
    to_stripe_invoice_item,
)

__all__ = [
    "API_VERSION",
    "StripeAdapter",
    "StripeClientSettings",
    "StripeSettings",
    "classify_stripe_error",
    "invoice_total_minor",
    "stripe_amount",
    "to_stripe_customer",
    "to_stripe_finalize",
    "to_stripe_invoice",
    "to_stripe_invoice_item",
]
