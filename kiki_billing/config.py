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
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kiki_billing.errors import InputError
from kiki_billing.exports.csv_formats import QuickBooksCsvSettings, XeroCsvSettings
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
        "carry_forward_below",
        "timezone",
    }
)
CLIENT_KEYS = DEFAULT_KEYS | {"id", "name", "email", "invoice_sequence", "targets"}


class ExportSettings(Frozen):
    """The ``[exports]`` table."""

    xero: XeroCsvSettings = XeroCsvSettings()
    quickbooks: QuickBooksCsvSettings = QuickBooksCsvSettings()


@dataclass(frozen=True)
class ContractsFile:
    """A parsed contracts file.

    Attributes:
        tables: The file's ``[exports]`` and ``[targets]`` tables as plain mappings, for the
            targets that take their defaults from them.
        lines: The line of each client's ``id``, for error messages.
    """

    path: Path
    contracts: tuple[Contract, ...]
    exports: ExportSettings
    tables: Mapping[str, Any] = field(default_factory=dict)
    lines: Mapping[str, int] = field(default_factory=dict)

    def timezones(self) -> dict[str, str]:
        """Each client's time zone, for the period window of the sources."""
        return {c.client_id: c.timezone for c in self.contracts}

    def by_id(self) -> dict[str, Contract]:
        """Contracts keyed by client id (built once)."""
        cached: dict[str, Contract] | None = self.__dict__.get("_by_id")
        if cached is None:
            cached = {c.client_id: c for c in self.contracts}
            object.__setattr__(self, "_by_id", cached)
        return cached

    def table(self, dotted: str) -> dict[str, Any]:
        """A table by its dotted name (``exports.xero``, ``targets.stripe``); empty if absent."""
        node: Any = self.tables
        for part in dotted.split("."):
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
        return dict(node) if isinstance(node, Mapping) else {}

    def line_of(self, client_id: str) -> int | None:
        """The line of a client's ``id`` in the file."""
        return self.lines.get(client_id)


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
    unknown = set(data) - {"defaults", "clients", "exports", "targets"}
    if unknown:
        raise InputError("unknown top-level table", file=where, field=sorted(unknown)[0])
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError("must be a table", file=where, field="defaults")
    for key in defaults:
        if key not in DEFAULT_KEYS:
            raise InputError("unknown key in [defaults]", file=where, field=f"defaults.{key}")
    for table in ("exports", "targets"):
        value = data.get(table, {})
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise InputError(f"[{table}] must hold one table per target", file=where, field=table)
    clients = data.get("clients", [])
    if not isinstance(clients, list) or not clients:
        raise InputError("no [[clients]] defined", file=where, field="clients")
    lines = _id_lines(text)
    contracts: list[Contract] = []
    seen: set[str] = set()
    for index, raw in enumerate(clients):
        contract = _contract(raw, defaults, index, where, lines)
        if contract.client_id in seen:
            raise InputError(
                f"client id {contract.client_id!r} defined twice",
                file=where,
                row=_second(lines, contract.client_id),
                field="id",
            )
        seen.add(contract.client_id)
        contracts.append(contract)
    try:
        exports = ExportSettings.model_validate(data.get("exports", {}))
    except ValidationError as exc:
        raise validation_to_input_error(exc, file=where, row=None, prefix="[exports] ") from None
    return ContractsFile(
        path=path,
        contracts=tuple(contracts),
        exports=exports,
        tables={"exports": data.get("exports", {}), "targets": data.get("targets", {})},
        lines={client_id: rows[0] for client_id, rows in lines.items()},
    )


def _contract(
    raw: Any, defaults: dict[str, Any], index: int, where: str, lines: Mapping[str, list[int]]
) -> Contract:
    if not isinstance(raw, dict):
        raise InputError("must be a table", file=where, field=f"clients[{index}]")
    client_id = raw.get("id")
    row = lines.get(client_id, [None])[0] if isinstance(client_id, str) else None
    label = f"client {client_id!r}: " if isinstance(client_id, str) else f"client #{index + 1}: "
    fields: dict[str, Any] = {}
    settings: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            swallowed = sorted(set(value) & CLIENT_KEYS)
            if swallowed:
                raise InputError(
                    label + f"{swallowed[0]!r} is inside [clients.{key}]: in TOML every key after "
                    f"a [clients.{key}] header belongs to that table; move the client's own keys "
                    "above its first [clients.<target>] table",
                    file=where,
                    row=row,
                    field=f"clients.{key}.{swallowed[0]}",
                )
            settings[key] = value
        elif key in CLIENT_KEYS:
            fields[key] = value
        else:
            raise InputError(label + "unknown key", file=where, row=row, field=key)
    for required in ("id", "name"):
        if required not in fields:
            raise InputError(label + "missing required key", file=where, row=row, field=required)
    targets = fields.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise InputError(
            label + "must be a list of target names", file=where, row=row, field="targets"
        )
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise InputError(
            label + f"target {repeated[0]!r} is listed twice", file=where, row=row, field="targets"
        )
    unlisted = sorted(set(settings) - set(targets))
    if unlisted:
        raise InputError(
            label + f"has a [clients.{unlisted[0]}] table but {unlisted[0]!r} is not in its "
            "targets (add it to targets, or remove the table)",
            file=where,
            row=row,
            field=f"clients.{unlisted[0]}",
        )
    merged = {**defaults, **fields}
    merged["client_id"] = merged.pop("id")
    merged["targets"] = tuple(targets)
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


_ID_LINE = re.compile(r"""^\s*id\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')""")


def _id_lines(text: str) -> dict[str, list[int]]:
    """The lines (1-based) on which each ``id = "..."`` appears, in one pass."""
    found: dict[str, list[int]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _ID_LINE.match(line)
        if match:
            found.setdefault(match.group(1) or match.group(2) or "", []).append(number)
    return found


def _second(lines: Mapping[str, list[int]], client_id: str) -> int | None:
    rows = lines.get(client_id, [])
    return rows[1] if len(rows) > 1 else (rows[0] if rows else None)
