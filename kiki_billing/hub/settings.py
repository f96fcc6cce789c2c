"""The hub's own settings, from ``KIKI_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiki_billing.errors import ConfigurationError
from kiki_billing.hub.retry import RetryPolicy

# NOTE: SQLAlchemy dialects whose driver ships with an extra of ours.
_DRIVER_EXTRAS = {"postgresql": "postgres", "postgres": "postgres"}


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kiki-billing"


class HubSettings(BaseSettings):
    """Ledger location, retry policy, circuit breaker and leases (``KIKI_LEDGER_URL``, ...)."""

    model_config = SettingsConfigDict(env_prefix="KIKI_", extra="ignore", frozen=True)

    ledger_url: str | None = None
    """Any SQLAlchemy URL; default: a SQLite file in ``data_dir``."""
    data_dir: Path = Field(default_factory=_default_data_dir)
    retry_max_attempts: int = Field(default=6, ge=1, le=50)
    retry_max_seconds: float = Field(default=300.0, gt=0, le=86400)
    retry_initial_wait: float = Field(default=0.5, ge=0, le=3600)
    retry_max_wait: float = Field(default=30.0, ge=0, le=3600)
    retry_max_retry_after: float = Field(default=120.0, ge=0, le=86400)
    breaker_threshold: int = Field(default=5, ge=1, le=10000)
    breaker_cooldown: float = Field(default=60.0, ge=0, le=86400)
    lease_seconds: float = Field(default=120.0, ge=5, le=86400)
    broker_url: str | None = None
    """The Celery broker of ``--executor celery`` (``redis://...`` or ``amqp://...``)."""
    limits_url: str | None = None
    """The Redis that holds the shared rate limits and breakers; default: a Redis broker."""
    celery_queue: str = Field(default="kiki-deliveries", min_length=1, max_length=200)
    celery_visibility_timeout: float = Field(default=3600.0, ge=10, le=7 * 86400)
    """Seconds before a Redis broker hands an unacknowledged task to another worker."""
    celery_resend_after: float = Field(default=300.0, ge=1, le=86400)
    """Seconds without progress after which a waiting push queues again the tasks of its
    deliveries that no live worker holds (a task the broker lost)."""
    slot_lease: float = Field(default=15.0, ge=1, le=3600)
    """Seconds a dead worker's concurrency slot stays taken."""

    def retry_policy(self) -> RetryPolicy:
        """The retry policy these settings describe."""
        return RetryPolicy(
            max_attempts=self.retry_max_attempts,
            max_seconds=self.retry_max_seconds,
            initial_wait=self.retry_initial_wait,
            max_wait=self.retry_max_wait,
            max_retry_after=self.retry_max_retry_after,
        )

    def ledger_location(self) -> str:
        """The ledger's URL (the default SQLite file is not created here)."""
        return self.ledger_url or f"sqlite:///{self.data_dir / 'ledger.sqlite3'}"


def load_hub_settings() -> HubSettings:
    """The hub's settings from the environment.

    Raises:
        ConfigurationError: A value is malformed or out of range; names the variable, never
            the value.
    """
    try:
        return HubSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = "KIKI_" + "_".join(str(p) for p in first["loc"]).upper()
        reason = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigurationError(f"{variable} is invalid: {reason}") from None


def driver_hint(url: str) -> str:
    """What to install for a ledger URL's database driver."""
    scheme = url.partition("://")[0].partition("+")[0]
    extra = _DRIVER_EXTRAS.get(scheme)
    if extra:
        return f"pip install 'kiki-billing[{extra}]'"
    return "install the SQLAlchemy driver it names"
