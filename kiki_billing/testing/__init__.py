"""What an adapter author needs: an in-memory billing system double and a contract suite."""

from kiki_billing.testing.contract import AdapterContractSuite, SentRequest, sample_invoice
from kiki_billing.testing.memory import Fault, MemoryAdapter, MemoryBillingSystem

__all__ = [
    "AdapterContractSuite",
    "Fault",
    "MemoryAdapter",
    "MemoryBillingSystem",
    "SentRequest",
    "sample_invoice",
]
