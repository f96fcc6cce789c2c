"""File exports as delivery targets: ``json``, ``quickbooks_csv`` and ``xero_csv``.

They go through the same adapter contract as the billing systems: one ``write`` step per
invoice, idempotent by content (a file that already holds the same bytes is left alone, one
that holds other bytes is a terminal error, never overwritten). Rendering lives in
:mod:`kiki_billing.exports`; these classes only deliver what it renders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic_settings import SettingsConfigDict

from kiki_billing.exports.csv_formats import (
    QuickBooksCsvSettings,
    XeroCsvSettings,
    render_quickbooks_csv,
    render_xero_csv,
)
from kiki_billing.exports.files import write_files_atomically
from kiki_billing.exports.json_export import invoice_document
from kiki_billing.plugin import (
    AdapterSettings,
    BillingAdapter,
    ClientSettings,
    DeliveryError,
    InputError,
    Invoice,
    NoClientSettings,
    RateLimit,
    RateWindow,
    Step,
    StepContext,
    StepRequest,
    TerminalError,
)


class FileTargetSettings(AdapterSettings):
    """Where a file target writes (``KIKI_<TARGET>_DIR``)."""

    dir: Path = Path("kiki-out/exports")


FileSettingsT = TypeVar("FileSettingsT", bound=FileTargetSettings)
FileClientT = TypeVar("FileClientT", bound=ClientSettings)


class FileTarget(BillingAdapter[FileSettingsT, FileClientT], Generic[FileSettingsT, FileClientT]):
    """Base of the file targets: one file per invoice, written atomically (owner-only)."""

    suffix: ClassVar[str]
    # NOTE: one writer: the ledger's commits serialise anyway, and measured with 2,000 invoices
    # (bench/hub_cpu.py) one thread spends 1.7 ms of CPU per invoice where four spent 2.7,
    # and finishes sooner.
    default_rate_limit: ClassVar[RateLimit] = RateLimit((RateWindow(100_000, 1.0),), concurrency=1)

    def __init__(self, settings: FileSettingsT, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._account = str(settings.dir.resolve())

    @property
    def directory(self) -> Path:
        """The folder files are written to."""
        return self.settings.dir

    @property
    def account(self) -> str:
        """One "account" per folder (its absolute path)."""
        return self._account

    def render(self, invoice: Invoice, client: FileClientT) -> str:
        """The file's content."""
        raise NotImplementedError

    def path(self, invoice: Invoice) -> Path:
        """Where the invoice's file goes."""
        return self.directory / f"{invoice.number}.r{invoice.revision}{self.suffix}"

    def steps(self, invoice: Invoice, client: FileClientT) -> Sequence[Step[FileClientT]]:
        """A single ``write`` step."""
        content = self.render(invoice, client).encode()
        digest = hashlib.sha256(content).hexdigest()
        path = self.path(invoice)
        written = {"path": str(path), "sha256": digest}

        def request(_: StepContext[FileClientT]) -> StepRequest:
            return StepRequest("WRITE", str(path), {"bytes": len(content), "sha256": digest})

        def existing(_: StepContext[FileClientT]) -> Mapping[str, str] | None:
            try:
                held = path.read_bytes()
            except FileNotFoundError:
                return None
            if hashlib.sha256(held).hexdigest() != digest:
                raise TerminalError(f"{path} exists with other content; not overwritten")
            return written

        def send(_: StepContext[FileClientT], __: StepRequest) -> Mapping[str, str]:
            try:
                write_files_atomically(path.parent, {path.name: content.decode()})
            except InputError as exc:
                raise TerminalError(exc.message) from None
            return written

        return [Step("write", request=request, send=send, skip=existing)]

    def classify(self, error: Exception) -> DeliveryError:
        """Filesystem errors are terminal: retrying will not free a full disk."""
        return TerminalError(f"{type(error).__name__}: {error}")


class JsonSettings(FileTargetSettings):
    """``KIKI_JSON_DIR``."""

    model_config = SettingsConfigDict(env_prefix="KIKI_JSON_", extra="ignore", frozen=True)
    dir: Path = Path("kiki-out/exports/json")


class JsonFileAdapter(FileTarget[JsonSettings, NoClientSettings]):
    """Canonical JSON file per invoice."""

    name = "json"
    suffix = ".json"

    def render(self, invoice: Invoice, client: NoClientSettings) -> str:
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


class QuickBooksCsvAdapter(FileTarget[QuickBooksCsvSettingsEnv, QuickBooksCsvClientSettings]):
    """QuickBooks Online invoice-import CSV file per invoice."""

    name = "quickbooks_csv"
    suffix = ".csv"
    defaults_tables = ("exports.quickbooks",)

    def render(self, invoice: Invoice, client: QuickBooksCsvClientSettings) -> str:
        """The QuickBooks import rows of the invoice."""
        return render_quickbooks_csv([invoice], client)


class XeroCsvClientSettings(ClientSettings, XeroCsvSettings):
    """``[clients.xero_csv]``: date format, account code, tax type."""


class XeroCsvSettingsEnv(FileTargetSettings):
    """``KIKI_XERO_CSV_DIR``."""

    model_config = SettingsConfigDict(env_prefix="KIKI_XERO_CSV_", extra="ignore", frozen=True)
    dir: Path = Path("kiki-out/exports/xero")


class XeroCsvAdapter(FileTarget[XeroCsvSettingsEnv, XeroCsvClientSettings]):
    """Xero sales-invoice import CSV file per invoice."""

    name = "xero_csv"
    suffix = ".csv"
    defaults_tables = ("exports.xero",)

    def render(self, invoice: Invoice, client: XeroCsvClientSettings) -> str:
        """The Xero import rows of the invoice."""
        return render_xero_csv([invoice], client)[0]


__all__ = [
    "FileTarget",
    "JsonFileAdapter",
    "QuickBooksCsvAdapter",
    "XeroCsvAdapter",
]
