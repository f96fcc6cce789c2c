"""The hub's own settings, from ``KIKI_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiki_billing.hub.ledger import Ledger, default_ledger_url
from kiki_billing.hub.retry import RetryPolicy


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kiki-billing"


class HubSettings(BaseSettings):
    """Ledger location, retry policy and circuit breaker (``KIKI_LEDGER_URL``, ...)."""

    model_config = SettingsConfigDict(env_prefix="KIKI_", extra="ignore", frozen=True)

    ledger_url: str | None = None
    """Any SQLAlchemy URL; default: a SQLite file in ``data_dir``."""
    data_dir: Path = Field(default_factory=_default_data_dir)
    retry_max_attempts: int = Field(default=6, ge=1, le=50)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    retry_initial_wait: float = Field(default=0.5, ge=0)
    retry_max_wait: float = Field(default=30.0, ge=0)
    retry_max_retry_after: float = Field(default=120.0, ge=0)
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=60.0, ge=0)
    lease_seconds: float = Field(default=120.0, gt=0)

    def retry_policy(self) -> RetryPolicy:
        """The retry policy these settings describe."""
        return RetryPolicy(
            max_attempts=self.retry_max_attempts,
            max_seconds=self.retry_max_seconds,
            initial_wait=self.retry_initial_wait,
            max_wait=self.retry_max_wait,
            max_retry_after=self.retry_max_retry_after,
        )

    def open_ledger(self) -> Ledger:
        """Open (and create if needed) the ledger."""
        url = self.ledger_url or default_ledger_url(self.data_dir)
        return Ledger(url, lease_seconds=self.lease_seconds)
