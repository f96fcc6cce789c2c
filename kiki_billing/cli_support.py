"""What every command of the CLI shares: its consoles and how user mistakes are reported."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from kiki_billing.errors import KikiError
from kiki_billing.logging import configure_logging

P = ParamSpec("P")
R = TypeVar("R")

# Not on a terminal (a pipe, a CI log) rich would wrap tables at 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Report a :class:`KikiError` as one line on stderr and exit with its code (2)."""
    try:
        yield
    except KikiError as exc:
        err_console.print(f"error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command: configure logging, and report a :class:`KikiError` as one line."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        configure_logging()
        with reported_errors():
            return command(*args, **kwargs)

    return wrapper
