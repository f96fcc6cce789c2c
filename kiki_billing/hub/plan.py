"""Which deliveries a run makes: invoices x their clients' targets, from the contracts file.

Planning checks every piece of configuration before anything is sent: each target is an
installed adapter whose SDK and credentials are present, and each client's per-target table is
valid over the contracts file's defaults. ``push`` plans from freshly computed invoices;
``retry`` plans from the invoices recorded in the ledger, but with the *current* contracts file
and settings, so fixing a setting and running ``retry`` works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kiki_billing.config import ContractsFile
from kiki_billing.errors import ConfigurationError, InputError
from kiki_billing.models import Invoice
from kiki_billing.plugin import BillingAdapter, ClientSettings

AdapterFactory = Callable[[str], BillingAdapter[Any, Any]]


@dataclass(frozen=True)
class Delivery:
    """One invoice to one target account, with the client's settings for that target."""

    invoice: Invoice
    target: str
    client: ClientSettings
    account: str


@dataclass(frozen=True)
class Plan:
    """The deliveries of a run and the configured adapter of each target."""

    deliveries: list[Delivery]
    adapters: dict[str, BillingAdapter[Any, Any]]

    def close(self) -> None:
        """Release every adapter's SDK resources."""
        for adapter in self.adapters.values():
            adapter.close()


def target_defaults(
    contracts: ContractsFile, adapter: type[BillingAdapter[Any, Any]]
) -> dict[str, Any]:
    """Every client's defaults for an adapter: its ``defaults_tables``, then ``[targets.X]``.

    Raises:
        InputError: ``[targets.<name>]`` holds a key the adapter's client settings lack.
    """
    merged: dict[str, Any] = {}
    for dotted in adapter.defaults_tables:
        merged.update(contracts.table(dotted))
    own = contracts.table(f"targets.{adapter.name}")
    unknown = sorted(set(own) - set(adapter.client_settings_model.model_fields))
    if unknown:
        raise InputError(
            f"unknown key for target {adapter.name!r}",
            file=str(contracts.path),
            field=f"targets.{adapter.name}.{unknown[0]}",
        )
    merged.update(own)
    return merged


def plan_deliveries(
    invoices: Sequence[Invoice],
    contracts: ContractsFile,
    create_adapter: AdapterFactory,
    *,
    known_targets: Sequence[str],
    target: str | None = None,
    client: str | None = None,
    only: Mapping[str, set[str]] | None = None,
) -> Plan:
    """Work out every delivery of a run and check all configuration before anything is sent.

    Args:
        invoices: The invoices to deliver.
        contracts: The contracts file (targets and per-target settings of each client).
        create_adapter: Loads and configures an adapter by name.
        known_targets: Names of the installed adapters.
        target: Only this target.
        client: Only this client.
        only: Only these targets per invoice number (``retry``).

    Raises:
        ConfigurationError: An unknown target, a missing SDK or credential.
        InputError: A malformed per-client target setting (names the contracts file, the
            client's line and the field), or an unknown ``--client``.
    """
    where = str(contracts.path)
    by_id = contracts.by_id()
    if target is not None and target not in known_targets:
        raise ConfigurationError(
            f"unknown target {target!r} (installed adapters: {', '.join(known_targets)})"
        )
    if client is not None and client not in by_id:
        raise InputError(
            f"no client {client!r} in the contracts file", file=where, field="--client"
        )
    for contract in contracts.contracts:
        for name in (*contract.targets, *contract.target_settings):
            if name not in known_targets:
                raise ConfigurationError(
                    f"{where}: client {contract.client_id!r}: unknown target {name!r} "
                    f"(installed adapters: {', '.join(known_targets)})"
                )
    wanted = []
    for inv in invoices:
        found = by_id.get(inv.client_id)
        if found is None:
            raise InputError(
                f"invoice {inv.number} is for client {inv.client_id!r}, who is no longer in the "
                "contracts file",
                file=where,
                field="clients",
            )
        for name in found.targets:
            if target is not None and name != target:
                continue
            if client is not None and inv.client_id != client:
                continue
            if only is not None and name not in only.get(inv.number, set()):
                continue
            wanted.append((inv, name))
    adapters = {name: create_adapter(name) for name in sorted({name for _, name in wanted})}
    defaults = {name: target_defaults(contracts, type(a)) for name, a in adapters.items()}
    settings_cache: dict[tuple[str, str], ClientSettings] = {}
    deliveries = []
    for inv, name in wanted:
        cache_key = (inv.client_id, name)
        settings = settings_cache.get(cache_key)
        if settings is None:
            owner = by_id[inv.client_id]
            table = owner.target_settings.get(name, {})
            try:
                settings = type(adapters[name]).client_settings(defaults[name], table)
            except ValidationError as exc:
                first = exc.errors()[0]
                field_name = ".".join(str(p) for p in first["loc"])
                reason = str(first["msg"]).removeprefix("Value error, ")
                if first["type"] == "extra_forbidden":
                    reason = f"unknown key for target {name!r}"
                raise InputError(
                    f"client {owner.client_id!r}: {reason}",
                    file=where,
                    row=contracts.line_of(owner.client_id),
                    field=f"clients.{name}.{field_name}",
                ) from None
            settings_cache[cache_key] = settings
        deliveries.append(
            Delivery(invoice=inv, target=name, client=settings, account=adapters[name].account)
        )
    return Plan(deliveries=deliveries, adapters=adapters)
