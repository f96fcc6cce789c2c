"""The contracts file (TOML): defaults, one table per client, export options.

::

    [defaults]                 # every key optional
    currency = "USD"
    baseline_roas = "3.0"
    share_rate = "0.10"

    [[clients]]
    id = "acme"
    name = "Acme Corp"
    targets = ["stripe"]
    [clients.stripe]           # per-client settings of one target
    collection = "auto"

Numbers may be written as TOML numbers or strings; both are read exactly (never as floats).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from kiki_billing.errors import InputError
from kiki_billing.models import Contract, Frozen
from kiki_billing.sources.base import decode_utf8, read_bytes
from kiki_billing.sources.metrics_file import validation_to_input_error

DEFAULT_KEYS = frozenset(
    {
        "currency",
        "baseline_roas",
        "share_rate",
        "floor",
        "payment_terms_days",
        "rounding",
        "minimum_fee",
        "fee_cap",
        "timezone",
    }
)
CLIENT_KEYS = DEFAULT_KEYS | {"id", "name", "email", "invoice_sequence", "targets"}


class XeroCsvSettings(Frozen):
    """Options of the Xero sales-invoice import CSV."""

    date_format: Literal["DD/MM/YYYY", "MM/DD/YYYY"] = "DD/MM/YYYY"
    account_code: str = "200"
    tax_type: str = "Tax Exempt"
    branding_theme: str | None = None


class QuickBooksCsvSettings(Frozen):
    """Options of the QuickBooks Online invoice import CSV."""

    date_format: Literal["MM/DD/YYYY", "DD/MM/YYYY"] = "MM/DD/YYYY"
    item: str = "Profit share"
    location: str | None = None
    home_currency: str = "USD"


class ExportSettings(Frozen):
    """The ``[exports]`` table."""

    xero: XeroCsvSettings = XeroCsvSettings()
    quickbooks: QuickBooksCsvSettings = QuickBooksCsvSettings()


@dataclass(frozen=True)
class ContractsFile:
    """A parsed contracts file."""

    path: Path
    contracts: tuple[Contract, ...]
    exports: ExportSettings

    def timezones(self) -> dict[str, str]:
        """Each client's time zone, for the period window of the sources."""
        return {c.client_id: c.timezone for c in self.contracts}

    def by_id(self) -> dict[str, Contract]:
        """Contracts keyed by client id."""
        return {c.client_id: c for c in self.contracts}


def load_contracts(path: Path) -> ContractsFile:
    """Read and validate a contracts file.

    Raises:
        InputError: The file is unreadable, not TOML, or a value is invalid; the error names
            the file, the line of the client's ``id`` where it can, and the field.
    """
    where = str(path)
    text = decode_utf8(read_bytes(path), path)
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        raise InputError(f"not valid TOML: {exc}", file=where, row=line) from None
    unknown = set(data) - {"defaults", "clients", "exports"}
    if unknown:
        raise InputError("unknown top-level table", file=where, field=sorted(unknown)[0])
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError("must be a table", file=where, field="defaults")
    for key in defaults:
        if key not in DEFAULT_KEYS:
            raise InputError("unknown key in [defaults]", file=where, field=f"defaults.{key}")
    clients = data.get("clients", [])
    if not isinstance(clients, list) or not clients:
        raise InputError("no [[clients]] defined", file=where, field="clients")
    contracts: list[Contract] = []
    seen: set[str] = set()
    for index, raw in enumerate(clients):
        contract = _contract(raw, defaults, index, where, text)
        if contract.client_id in seen:
            raise InputError(
                f"client id {contract.client_id!r} defined twice",
                file=where,
                row=_line_of_id(text, contract.client_id),
                field="id",
            )
        seen.add(contract.client_id)
        contracts.append(contract)
    try:
        exports = ExportSettings.model_validate(data.get("exports", {}))
    except ValidationError as exc:
        raise validation_to_input_error(exc, file=where, row=None) from None
    return ContractsFile(path=path, contracts=tuple(contracts), exports=exports)


def _contract(raw: Any, defaults: dict[str, Any], index: int, where: str, text: str) -> Contract:
    if not isinstance(raw, dict):
        raise InputError("must be a table", file=where, field=f"clients[{index}]")
    client_id = raw.get("id")
    row = _line_of_id(text, client_id) if isinstance(client_id, str) else None
    label = f"client {client_id!r}: " if isinstance(client_id, str) else f"client #{index + 1}: "
    fields: dict[str, Any] = {}
    settings: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            settings[key] = value
        elif key in CLIENT_KEYS:
            fields[key] = value
        else:
            raise InputError(label + "unknown key", file=where, row=row, field=key)
    for required in ("id", "name"):
        if required not in fields:
            raise InputError(label + "missing required key", file=where, row=row, field=required)
    merged = {**defaults, **fields}
    merged["client_id"] = merged.pop("id")
    merged["targets"] = tuple(merged.get("targets", ()))
    for key, value in list(merged.items()):
        if isinstance(value, int | Decimal) and key not in (
            "payment_terms_days",
            "invoice_sequence",
        ):
            merged[key] = str(value)
    try:
        return Contract(**merged, target_settings=settings)
    except ValidationError as exc:
        error = validation_to_input_error(exc, file=where, row=row, prefix=label)
        if error.field == "client_id":
            error = InputError(error.message, file=where, row=row, field="id")
        elif error.field in defaults and error.field not in fields:
            error = InputError(error.message, file=where, row=row, field=f"defaults.{error.field}")
        raise error from None


def _line_of_id(text: str, client_id: str) -> int | None:
    pattern = re.compile(r"^\s*id\s*=\s*[\"']" + re.escape(client_id) + r"[\"']", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None
