"""``python -m kiki_billing``."""

from kiki_billing.cli import main

main()
