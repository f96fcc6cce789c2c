"""File exports as delivery targets: ``json``, ``quickbooks_csv`` and ``xero_csv``.

They go through the same adapter contract as the billing systems: one ``write`` step per
invoice, idempotent by content (a file that already holds the same bytes is left alone, one
that holds other bytes is a terminal error, never overwritten). Rendering lives in
:mod:`kiki_billing.exports`; these classes only deliver what it renders.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic_settings import SettingsConfigDict

from kiki_billing.exports.csv_formats import (
    QuickBooksCsvSettings,
    XeroCsvSettings,
    render_quickbooks_credit_memo_csv,
    render_quickbooks_csv,
    render_xero_credit_note_csv,
    render_xero_csv,
)
from kiki_billing.exports.files import write_files_atomically
from kiki_billing.exports.json_export import credit_note_document, invoice_document
from kiki_billing.plugin import (
    AdapterSettings,
    BillingAdapter,
    ClientSettings,
    Correction,
    DeliveryError,
    InputError,
    Invoice,
    NoClientSettings,
    PaymentState,
    RateLimit,
    RateWindow,
    RemoteInvoice,
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
    tracks_payments = False
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

    def render_credit_note(
        self, credited: Invoice, replacement: Invoice, client: FileClientT
    ) -> str:
        """The file that credits a superseded revision in full."""
        raise NotImplementedError

    def credit_note_path(self, credited: Invoice) -> Path:
        """Where the credit note of a superseded revision goes."""
        return self.directory / f"{credited.number}.r{credited.revision}.credit-note{self.suffix}"

    def steps(self, invoice: Invoice, client: FileClientT) -> Sequence[Step[FileClientT]]:
        """A single ``write`` step."""
        return [_write_step("write", self.path(invoice), self.render(invoice, client))]

    def correction_steps(
        self, correction: Correction, client: FileClientT
    ) -> Sequence[Step[FileClientT]]:
        """A single ``credit-note`` step: the file that credits the revision in full.

        A file cannot be voided once an accountant may have imported it, and carries no payment
        state: whether the revision was paid or not, it is credited (void and credit alike).
        """
        credited, replacement = correction.invoice, correction.replacement
        content = self.render_credit_note(credited, replacement, client)
        return [_write_step("credit-note", self.credit_note_path(credited), content)]

    def remote_invoices(self, invoice: Invoice, refs: Mapping[str, str]) -> list[RemoteInvoice]:
        """The revision's file, if it is there (read-only): open, or void once credited."""
        path = self.path(invoice)
        if not path.is_file():
            return []
        credited = self.credit_note_path(invoice).is_file()
        return [_file_remote(path, invoice, credited)]

    def remote_period_invoices(self, period: str) -> list[RemoteInvoice]:
        """Every invoice file of the period in the folder (named ``KIKI-OaaS-YYYYMM-...``)."""
        compact = period.replace("-", "")
        found = []
        for path in sorted(self.directory.glob(f"*-{compact}-*.r*{self.suffix}")):
            match = _FILE_NAME.fullmatch(path.name.removesuffix(self.suffix))
            if match is None:
                continue
            number, revision = match["number"], int(match["revision"])
            credited = path.with_name(f"{number}.r{revision}.credit-note{self.suffix}").is_file()
            found.append(
                RemoteInvoice(
                    refs={"path": str(path)},
                    kiki_number=number,
                    kiki_revision=revision,
                    number=path.name,
                    currency="",
                    total=Decimal(0),
                    amount_paid=Decimal(0),
                    state=PaymentState.VOID if credited else PaymentState.OPEN,
                )
            )
        return found

    def classify(self, error: Exception) -> DeliveryError:
        """Filesystem errors are terminal: retrying will not free a full disk."""
        return TerminalError(f"{type(error).__name__}: {error}")


_FILE_NAME = re.compile(r"(?P<number>.+)\.r(?P<revision>\d+)")


def _write_step(name: str, path: Path, text: str) -> Step[Any]:
    """Write ``text`` to ``path`` once (same bytes there: left alone; other bytes: refused)."""
    content = text.encode()
    digest = hashlib.sha256(content).hexdigest()
    written = {"path": str(path), "sha256": digest}

    def request(_: StepContext[Any]) -> StepRequest:
        return StepRequest("WRITE", str(path), {"bytes": len(content), "sha256": digest})

    def existing(_: StepContext[Any]) -> Mapping[str, str] | None:
        try:
            held = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(held).hexdigest() != digest:
            raise TerminalError(f"{path} exists with other content; not overwritten")
        return written

    def send(_: StepContext[Any], __: StepRequest) -> Mapping[str, str]:
        try:
            write_files_atomically(path.parent, {path.name: text})
        except InputError as exc:
            raise TerminalError(exc.message) from None
        return written

    return Step(name, request=request, send=send, skip=existing)


def _file_remote(path: Path, invoice: Invoice, credited: bool) -> RemoteInvoice:
    return RemoteInvoice(
        refs={"path": str(path)},
        kiki_number=invoice.number,
        kiki_revision=invoice.revision,
        number=path.name,
        currency=invoice.currency,
        total=invoice.total_fee,
        amount_paid=Decimal(0),
        # NOTE: a file has no payment state; once its credit note is written it reads as void
        # (nothing of it is owed any more).
        state=PaymentState.VOID if credited else PaymentState.OPEN,
    )


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

    def render_credit_note(
        self, credited: Invoice, replacement: Invoice, client: NoClientSettings
    ) -> str:
        """The credit note's canonical JSON."""
        return credit_note_document(credited, replacement)


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

    def render_credit_note(
        self, credited: Invoice, replacement: Invoice, client: QuickBooksCsvClientSettings
    ) -> str:
        """The lines of the credit memo."""
        return render_quickbooks_credit_memo_csv(credited, replacement, client)


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

    def render_credit_note(
        self, credited: Invoice, replacement: Invoice, client: XeroCsvClientSettings
    ) -> str:
        """The Xero credit-note import rows."""
        return render_xero_credit_note_csv(credited, replacement, client)


__all__ = [
    "FileTarget",
    "JsonFileAdapter",
    "QuickBooksCsvAdapter",
    "XeroCsvAdapter",
]
