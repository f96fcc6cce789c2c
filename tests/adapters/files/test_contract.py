"""The shared adapter conformance suite, run on the file targets (json, QuickBooks and Xero CSV)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kiki_billing_adapters.files import (
    JsonFileAdapter,
    JsonSettings,
    QuickBooksCsvAdapter,
    QuickBooksCsvSettingsEnv,
    XeroCsvAdapter,
    XeroCsvSettingsEnv,
)

from kiki_billing.models import Invoice
from kiki_billing.testing import AdapterContractSuite


class FileSuite(AdapterContractSuite):
    """A file target against a temporary folder: its "provider" is the folder."""

    adapter_class: Any
    settings_class: Any

    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> Iterator[None]:
        self.folder = tmp_path / "exports"
        yield

    def adapter(self) -> Any:
        return self.adapter_class(self.settings_class(dir=self.folder))

    def sample_errors(self) -> Mapping[str, Exception]:
        # NOTE: a full disk or a missing permission cannot be waited out: terminal.
        return {"invalid": PermissionError(13, "Permission denied", str(self.folder))}

    def upstream_invoices(self, invoice: Invoice) -> int:
        if not self.folder.exists():
            return 0
        return sum(1 for path in self.folder.iterdir() if path.name.startswith(invoice.number))

    def expire_keys(self) -> None:
        """A file target keeps no keys: it is idempotent by content."""


class TestJsonFileContract(FileSuite):
    adapter_class = JsonFileAdapter
    settings_class = JsonSettings


class TestQuickBooksCsvContract(FileSuite):
    adapter_class = QuickBooksCsvAdapter
    settings_class = QuickBooksCsvSettingsEnv


class TestXeroCsvContract(FileSuite):
    adapter_class = XeroCsvAdapter
    settings_class = XeroCsvSettingsEnv
