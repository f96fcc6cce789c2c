"""File exports as delivery targets: ``json``, ``quickbooks_csv`` and ``xero_csv``.

They go through the same adapter contract as the billing systems: one ``write`` step per
invoice, idempotent by content (a file that already holds the same bytes is left alone, one
that holds other bytes is a terminal error, never overwritten).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic_settings import SettingsConfigDict

from kiki_billing.config import ContractsFile, QuickBooksCsvSettings, XeroCsvSettings
from kiki_billing.exports.csv_formats import render_quickbooks_csv, render_xero_csv
from kiki_billing.exports.files import write_files_atomically
from kiki_billing.exports.json_export import invoice_document
from kiki_billing.hub.adapter import (
    AdapterSettings,
    BillingAdapter,
    ClientSettings,
    RateLimit,
    Step,
    StepContext,
    StepRequest,
)
from kiki_billing.hub.errors import DeliveryError, TerminalError
from kiki_billing.models import Invoice


class FileTargetSettings(AdapterSettings):
    """Where a file target writes (``KIKI_<TARGET>_DIR``)."""

    dir: Path = Path("kiki-out/exports")


class FileTarget(BillingAdapter):
    """Base of the file targets: one file per invoice, written atomically."""

    suffix: ClassVar[str]
    default_rate_limit: ClassVar[RateLimit] = RateLimit(per_second=1000.0, burst=100, concurrency=4)

    @property
    def directory(self) -> Path:
        """The folder files are written to."""
        assert isinstance(self.settings, FileTargetSettings)
        return self.settings.dir

    @property
    def account(self) -> str:
        """One "account" per folder."""
        return str(self.directory.resolve())

    def render(self, invoice: Invoice, client: ClientSettings) -> str:
        """The file's content."""
        raise NotImplementedError

    def path(self, invoice: Invoice) -> Path:
        """Where the invoice's file goes."""
        return self.directory / f"{invoice.number}.r{invoice.revision}{self.suffix}"

    def steps(self, invoice: Invoice, client: ClientSettings) -> Sequence[Step]:
        """A single ``write`` step."""
        content = self.render(invoice, client)
        digest = hashlib.sha256(content.encode()).hexdigest()
        path = self.path(invoice)

        def request(_: StepContext) -> StepRequest:
            return StepRequest(
                "WRITE", str(path), {"bytes": len(content.encode()), "sha256": digest}
            )

        def existing(_: StepContext) -> Mapping[str, str] | None:
            if not path.exists():
                return None
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                raise TerminalError(f"{path} exists with other content; not overwritten")
            return {"path": str(path), "sha256": digest}

        def send(_: StepContext) -> Mapping[str, str]:
            write_files_atomically(path.parent, {path.name: content})
            return {"path": str(path), "sha256": digest}

        return [Step("write", request=request, send=send, lookup=existing, skip=existing)]

    def classify(self, error: Exception) -> DeliveryError:
        """Filesystem errors are terminal: retrying will not free a full disk."""
        return TerminalError(str(error))


class JsonSettings(FileTargetSettings):
    """``KIKI_JSON_DIR``."""

    model_config = SettingsConfigDict(env_prefix="KIKI_JSON_", extra="ignore", frozen=True)
    dir: Path = Path("kiki-out/exports/json")


class JsonFileAdapter(FileTarget):
    """Canonical JSON file per invoice."""

    name = "json"
    suffix = ".json"
    settings_model = JsonSettings

    def render(self, invoice: Invoice, client: ClientSettings) -> str:
        """The invoice's canonical JSON."""
        return invoice_document(invoice)


class QuickBooksCsvClientSettings(ClientSettings, QuickBooksCsvSettings):
    """``[clients.quickbooks_csv]``: date format, item, home currency."""


class QuickBooksCsvSettingsEnv(FileTargetSettings):
    """``KIKI_QUICKBOOKS_CSV_DIR``."""

    model_config = SettingsConfigDict(
        env_prefix="KIKI_QUICKBOOKS_CSV_", extra="ignore", frozen=True
    )
    dir: Path = Path("kiki-out/exports/quickbooks")


class QuickBooksCsvAdapter(FileTarget):
    """QuickBooks Online invoice-import CSV file per invoice."""

    name = "quickbooks_csv"
    suffix = ".csv"
    settings_model = QuickBooksCsvSettingsEnv
    client_settings_model = QuickBooksCsvClientSettings

    def client_defaults(self, contracts: ContractsFile) -> dict[str, Any]:
        """``[exports.quickbooks]`` of the contracts file."""
        return contracts.exports.quickbooks.model_dump()

    def render(self, invoice: Invoice, client: ClientSettings) -> str:
        """The QuickBooks import rows of the invoice."""
        assert isinstance(client, QuickBooksCsvSettings)
        return render_quickbooks_csv([invoice], client)


class XeroCsvClientSettings(ClientSettings, XeroCsvSettings):
    """``[clients.xero_csv]``: date format, account code, tax type."""


class XeroCsvSettingsEnv(FileTargetSettings):
    """``KIKI_XERO_CSV_DIR``."""

    model_config = SettingsConfigDict(env_prefix="KIKI_XERO_CSV_", extra="ignore", frozen=True)
    dir: Path = Path("kiki-out/exports/xero")


class XeroCsvAdapter(FileTarget):
    """Xero sales-invoice import CSV file per invoice."""

    name = "xero_csv"
    suffix = ".csv"
    settings_model = XeroCsvSettingsEnv
    client_settings_model = XeroCsvClientSettings

    def client_defaults(self, contracts: ContractsFile) -> dict[str, Any]:
        """``[exports.xero]`` of the contracts file."""
        return contracts.exports.xero.model_dump()

    def render(self, invoice: Invoice, client: ClientSettings) -> str:
        """The Xero import rows of the invoice."""
        assert isinstance(client, XeroCsvSettings)
        return render_xero_csv([invoice], client)[0]
