"""The built-in billing-system adapters of kiki-billing, one subpackage per provider.

Each is registered in the ``kiki_billing.adapters`` entry-point group exactly as a third-party
adapter would be, and imports nothing of ``kiki_billing`` but :mod:`kiki_billing.plugin` (the
file targets also use :mod:`kiki_billing.exports` to render their files).
"""
