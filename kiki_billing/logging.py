"""Structured logging: structlog, JSON lines when stderr is not a terminal."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog

from kiki_billing.errors import ConfigurationError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()


def register_secrets(values: Iterable[str]) -> None:
    """Never log these values, in any spelling (raw, ``repr``, JSON, URL-encoded).

    Adapters' keys and passwords are registered when an adapter is made, rotated tokens when
    they are stored; every log line is scrubbed of them, tracebacks included.
    """
    with _SECRETS_LOCK:
        _SECRETS.update(v for v in values if v and len(v) >= 6)


def _scrub(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    with _SECRETS_LOCK:
        secrets = list(_SECRETS)
    if not secrets:
        return event
    from kiki_billing.plugin import scrub_secrets

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return scrub_secrets(value, secrets)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        return scrub_secrets(str(value), secrets)

    return {key: clean(value) for key, value in event.items()}


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time.

    A live progress bar that redirects stderr then prints log lines above itself instead of
    being torn by them.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str | None = None) -> None:
    """Configure structlog once: console rendering on a terminal, JSON otherwise.

    Args:
        level: Log level name; defaults to ``KIKI_LOG_LEVEL`` or ``WARNING``.

    Raises:
        ConfigurationError: Not a known level.
    """
    name = (level or os.environ.get("KIKI_LOG_LEVEL") or "WARNING").strip().upper()
    if name not in LEVELS:
        raise ConfigurationError(f"KIKI_LOG_LEVEL is invalid: use one of {', '.join(LEVELS)}")
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer(sort_keys=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[name]),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
