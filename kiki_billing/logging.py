"""Structured logging: structlog, JSON lines when stderr is not a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from kiki_billing.errors import ConfigurationError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[name]),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
