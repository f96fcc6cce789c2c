"""``metrics serve`` and ``metrics write`` (imported when they run).

Both expose the same registry, computed from the ledger at each scrape or write
(:mod:`kiki_billing.hub.metrics`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog

from kiki_billing.cli_delivery import open_ledger
from kiki_billing.cli_support import err_console, warn
from kiki_billing.errors import ConfigurationError, InputError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from kiki_billing.hub.ledger import Ledger

log = structlog.get_logger("kiki_billing.metrics")
DEFAULT_SHARE_RATE = Decimal("0.10")
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def require(module: str, extra: str) -> None:
    """Refuse to start without an optional package, naming the extra that installs it.

    Raises:
        ConfigurationError: The module is not installed.
    """
    if importlib.util.find_spec(module) is None:
        raise ConfigurationError(
            f"this command needs the {module} package: pip install 'kiki-billing[{extra}]'"
        )


def default_share_rate(contracts: Path | None) -> Decimal:
    """The contracts file's ``[defaults] share_rate`` (10% without a file or a default).

    Raises:
        InputError: The file is invalid (checked in full), or its default is not a rate.
    """
    if contracts is None:
        return DEFAULT_SHARE_RATE
    from kiki_billing.config import load_contracts

    load_contracts(contracts)
    data = tomllib.loads(contracts.read_text(encoding="utf-8"), parse_float=Decimal)
    value = data.get("defaults", {}).get("share_rate")
    if value is None:
        return DEFAULT_SHARE_RATE
    try:
        rate = Decimal(str(value))
    except InvalidOperation:
        rate = Decimal(-1)
    if not Decimal(0) <= rate <= Decimal(1):
        raise InputError(
            "must be a rate between 0 and 1", file=str(contracts), field="defaults.share_rate"
        )
    return rate


@contextlib.contextmanager
def _registry(contracts: Path | None) -> Iterator[tuple[Ledger, CollectorRegistry]]:
    from kiki_billing.hub.settings import load_hub_settings

    require("prometheus_client", "metrics")
    from kiki_billing.hub.metrics import ledger_registry

    rate = default_share_rate(contracts)
    settings = load_hub_settings()
    with open_ledger(settings, must_exist=True) as ledger:
        if ledger is None:
            raise ConfigurationError(
                f"no ledger at {settings.data_dir / 'ledger.sqlite3'} yet: push first, or set "
                "KIKI_LEDGER_URL / KIKI_DATA_DIR to the ledger to read"
            )
        yield ledger, ledger_registry(ledger, default_share_rate=rate)


def run_metrics_write(*, file: Path, contracts: Path | None) -> None:
    """``kiki-billing metrics write FILE``: the textfile, replaced atomically.

    Raises:
        InputError: The folder does not exist, or FILE is a folder.
    """
    target = file.expanduser()
    if target.is_dir():
        raise InputError("is a folder; name the .prom file to write", file=str(file))
    if not target.parent.is_dir():
        raise InputError("its folder does not exist", file=str(file))
    if target.suffix != ".prom":
        warn(f"{file}: node_exporter's textfile collector reads only *.prom files")
    with _registry(contracts) as (_ledger, registry):
        from kiki_billing.hub.metrics import render

        text = render(registry)
    write_atomically(target, text)


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to a new file beside ``target``, sync it, then rename it over ``target``.

    A reader (node_exporter) sees the old file or the new one, never a part of one.

    Raises:
        InputError: The folder cannot be written.
    """
    try:
        fd, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror}", file=str(target)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise InputError(f"cannot write: {exc.strerror}", file=str(target)) from None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged to stderr (a scrape every few seconds)."""


def metrics_app(
    registry: CollectorRegistry, ping: Callable[[], None]
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """The WSGI app: ``/metrics`` (the registry), ``/healthz`` (the ledger answers)."""
    from kiki_billing.hub.metrics import render

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        if path == "/metrics":
            try:
                body = render(registry)
            except Exception as exc:
                log.error("metrics.collect_failed", error=type(exc).__name__)
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"the ledger could not be read\n"]
            start_response("200 OK", [("Content-Type", TEXT_FORMAT)])
            return [body if method == "GET" else b""]
        if path == "/healthz":
            try:
                ping()
            except Exception:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"ledger unavailable\n"]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: /metrics and /healthz are served\n"]

    return app


def run_metrics_serve(*, host: str, port: int, contracts: Path | None) -> None:
    """``kiki-billing metrics serve``: serve until interrupted (SIGINT or SIGTERM).

    Raises:
        ConfigurationError: The address cannot be listened on.
    """
    import sqlalchemy as sa

    with _registry(contracts) as (ledger, registry):

        def ping() -> None:
            with ledger.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))

        try:
            server = make_server(
                host,
                port,
                metrics_app(registry, ping),
                server_class=_Server,
                handler_class=_QuietHandler,
            )
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigurationError(f"cannot listen on {host}:{port}: {reason}") from None
        bound = server.server_address[1]
        serve_until_stopped(
            server.serve_forever,
            server.shutdown,
            f"serving http://{host}:{bound}/metrics and /healthz (Ctrl-C stops)",
        )
        server.server_close()


def serve_until_stopped(serve: Callable[[], None], stop: Callable[[], None], banner: str) -> None:
    """Run ``serve`` in this thread until SIGINT or SIGTERM, then ``stop`` it."""
    err_console().print(banner, markup=False)

    def on_signal(_signum: int, _frame: Any) -> None:
        threading.Thread(target=stop, daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
