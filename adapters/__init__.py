"""Billing-system adapters shipped with kiki-billing (found through entry points)."""
