"""What every command of the CLI shares: its consoles and how user mistakes are reported."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import typer

from kiki_billing.errors import KikiError

if TYPE_CHECKING:
    from rich.console import Console

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def console() -> Console:
    """Standard output (rich is imported on first use, not at start-up)."""
    from rich.console import Console

    # Not on a terminal (a pipe, a CI log) rich would wrap tables at 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


@functools.cache
def err_console() -> Console:
    """Standard error: progress bars, warnings and errors."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One warning line on stderr (plain text, never markup)."""
    err_console().print(f"warning: {message}", markup=False)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Report a :class:`KikiError` as one line on stderr and exit with its code (2)."""
    try:
        yield
    except KikiError as exc:
        err_console().print(f"error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command: configure logging, and report a :class:`KikiError` as one line."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from kiki_billing.logging import configure_logging

        with reported_errors():
            configure_logging()
            return command(*args, **kwargs)

    return wrapper
