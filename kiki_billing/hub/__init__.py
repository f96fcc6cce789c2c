"""Delivery of invoices to billing systems: adapters, keys, retries, rate limits, ledger."""
