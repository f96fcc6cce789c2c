"""``kiki-billing connect TARGET``: the first OAuth authorization, on a 127.0.0.1 redirect.

The user opens the provider's consent page; the provider redirects the browser to a one-shot
HTTP server on 127.0.0.1 with a code, which the adapter exchanges for tokens and stores in the
ledger database (the same store the hub's token refreshes use, under the account's lock).
"""

from __future__ import annotations

import http.server
import secrets
import threading
import webbrowser
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

from kiki_billing.cli_support import console, err_console
from kiki_billing.errors import ConfigurationError

PAGE = (
    "<!doctype html><meta charset=utf-8><title>kiki-billing</title>"
    "<p>{message}</p><p>You can close this window.</p>"
)


class _Callback(http.server.BaseHTTPRequestHandler):
    """Answers one redirect and hands its query to the waiting command."""

    server: _CallbackServer

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != self.server.path:
            self.send_error(404)
            return
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.server.query = query
        ok = "code" in query and not query.get("error")
        message = "kiki-billing received the authorization." if ok else "Authorization failed."
        body = PAGE.format(message=message).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.done.set()

    def log_message(self, format: str, *args: object) -> None:
        """The callback carries a code: never printed."""


class _CallbackServer(http.server.HTTPServer):
    def __init__(self, port: int, path: str) -> None:
        super().__init__(("127.0.0.1", port), _Callback)
        self.path = path
        self.query: Mapping[str, str] | None = None
        self.done = threading.Event()


def run_connect(
    *, target: str, port: int, open_browser: bool, timeout: float, redirect_path: str
) -> None:
    """``kiki-billing connect``."""
    from kiki_billing.cli_delivery import open_ledger
    from kiki_billing.hub.credentials import LedgerCredentialStore
    from kiki_billing.hub.registry import load_adapter_class
    from kiki_billing.hub.settings import load_hub_settings
    from kiki_billing.plugin import OAuthConnect

    if not 0 <= port <= 65535:
        raise ConfigurationError("--port must be between 0 and 65535")
    if not 0 < timeout <= 3600:
        raise ConfigurationError("--timeout must be more than 0 and at most 3600 seconds")
    cls = load_adapter_class(target)
    adapter = cls(cls.read_settings())
    if not isinstance(adapter, OAuthConnect):
        raise ConfigurationError(
            f"adapter {target!r} does not use OAuth: set its credentials in the environment"
        )
    path = "/" + redirect_path.strip("/")
    try:
        server = _CallbackServer(port, path)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    redirect_uri = f"http://127.0.0.1:{server.server_port}{path}"
    state = secrets.token_urlsafe(24)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = adapter.authorization_url(redirect_uri, state)
        err_console().print(
            f"Open this address to let kiki-billing reach {target} (redirect {redirect_uri}):",
            markup=False,
        )
        console().print(url, markup=False, soft_wrap=True)
        if open_browser:
            webbrowser.open(url)
        if not server.done.wait(timeout):
            raise ConfigurationError(f"no answer from {target}'s consent page in {timeout:g} s")
    finally:
        server.shutdown()
        server.server_close()
    callback = dict(server.query or {})
    if callback.get("state") != state:
        raise ConfigurationError(
            "the redirect's state does not match this request; nothing was stored (start again)"
        )
    with open_ledger(load_hub_settings()) as ledger:
        assert ledger is not None
        adapter.credentials = LedgerCredentialStore(ledger, target, adapter.account)
        connected = adapter.complete_authorization(callback, redirect_uri)
    console().print(f"Connected {target}: {connected}. Tokens stored in the ledger.", markup=False)
