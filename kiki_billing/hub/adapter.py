"""The contract between the hub and a billing system's adapter.

An adapter turns an :class:`~kiki_billing.models.Invoice` into a sequence of :class:`Step` s
(find or create the customer, create the draft, add the lines, finalize, collect). Each step
builds its request with a pure payload mapper and sends it through the provider's SDK. The hub
owns everything around a step: the idempotency key, retries, rate limits, the circuit breaker
and the ledger. An adapter never sleeps, never retries and never writes the ledger.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiki_billing.config import ContractsFile
from kiki_billing.hub.errors import DeliveryError
from kiki_billing.models import Invoice


class AdapterSettings(BaseSettings):
    """Credentials, endpoint and limits of one adapter, from ``KIKI_<ADAPTER>_*`` variables.

    Subclasses set ``model_config = SettingsConfigDict(env_prefix="KIKI_<ADAPTER>_")`` and hold
    secrets as :class:`pydantic.SecretStr`, so they never reach a log or an exception.
    """

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    rate_limit: float | None = None
    """Requests per second per account; ``None`` takes the adapter's published default."""
    concurrency: int | None = None
    """Requests in flight per account; ``None`` takes the adapter's default."""


class ClientSettings(BaseModel):
    """Per-client settings of one target (``[clients.<adapter>]`` in the contracts file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class RateLimit:
    """A provider's published limit for one account."""

    per_second: float
    burst: int = 1
    concurrency: int = 4


@dataclass(frozen=True)
class StepRequest:
    """What a step sends, for ``--dry-run`` and logs. Ids not known yet are ``{placeholders}``."""

    method: str
    path: str
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepContext:
    """What a step may use: the invoice, the client's settings, ids so far, its key."""

    invoice: Invoice
    client: ClientSettings
    refs: Mapping[str, str]
    idempotency_key: str


@dataclass(frozen=True)
class Step:
    """One write to the provider.

    Attributes:
        name: Stable name within the delivery (``customer``, ``draft``, ``line-1``, ...); part of
            the idempotency key, so renaming a step re-sends it.
        request: Builds the request from the context (pure; no I/O).
        send: Sends it with ``ctx.idempotency_key`` and returns the provider ids to record.
        lookup: Finds the step's object by its natural key after an earlier attempt whose
            outcome is unknown (a crash, a lost response); returns its ids, or ``None`` when the
            object does not exist and the step must be sent.
        skip: Returns ids when the step has nothing to send (e.g. a customer id is configured).
        requests: The most provider requests one ``send`` makes; the hub takes that many
            rate-limit slots before each attempt.
    """

    name: str
    request: Callable[[StepContext], StepRequest]
    send: Callable[[StepContext], Mapping[str, str]]
    lookup: Callable[[StepContext], Mapping[str, str] | None] | None = None
    skip: Callable[[StepContext], Mapping[str, str] | None] | None = None
    requests: int = 1


class NoClientSettings(ClientSettings):
    """An adapter without per-client settings."""


class BillingAdapter(ABC):
    """Base class of every billing-system adapter (built-in or third-party).

    Subclasses declare ``name``, ``settings_model`` and optionally ``client_settings_model``,
    ``extra``, ``requires`` and ``client_refs``, and implement :meth:`steps` and
    :meth:`classify`. They are found through the ``kiki_billing.adapters`` entry-point group.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    extra: ClassVar[str | None] = None
    """The ``pip install 'kiki-billing[extra]'`` that installs the adapter's SDK."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Modules the adapter imports (its SDK); checked before use."""
    settings_model: ClassVar[type[AdapterSettings]] = AdapterSettings
    client_settings_model: ClassVar[type[ClientSettings]] = NoClientSettings
    client_refs: ClassVar[tuple[str, ...]] = ()
    """Ids that belong to the client, not the invoice (``customer_id``): reused next period."""
    default_rate_limit: ClassVar[RateLimit] = RateLimit(per_second=10.0, burst=1, concurrency=4)

    def __init__(self, settings: AdapterSettings) -> None:
        self.settings = settings

    @property
    def account(self) -> str:
        """The provider account the settings point at; limits and breakers are per account."""
        return "default"

    def rate_limit(self) -> RateLimit:
        """The account's limit: the settings' override, else the adapter's default."""
        default = self.default_rate_limit
        return RateLimit(
            per_second=self.settings.rate_limit or default.per_second,
            burst=default.burst,
            concurrency=self.settings.concurrency or default.concurrency,
        )

    def client_defaults(self, contracts: ContractsFile) -> dict[str, Any]:
        """Defaults for every client's ``[clients.<name>]`` table, from the contracts file."""
        return {}

    def validate(self, invoice: Invoice, client: ClientSettings) -> None:  # noqa: B027
        """Refuse an invoice the provider cannot take, before any call.

        Raises:
            TerminalError: E.g. an amount over the provider's limit.
        """

    @abstractmethod
    def steps(self, invoice: Invoice, client: ClientSettings) -> Sequence[Step]:
        """The writes that deliver ``invoice``, in order."""

    @abstractmethod
    def classify(self, error: Exception) -> DeliveryError:
        """Map an SDK exception to a transient or terminal :class:`DeliveryError`."""

    def close(self) -> None:  # noqa: B027
        """Release SDK resources (sessions); called once after a push."""
