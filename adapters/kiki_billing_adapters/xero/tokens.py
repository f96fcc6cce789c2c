"""Xero's OAuth 2.0 tokens: access tokens refreshed early and after a 401, refresh tokens rotated.

Xero's access tokens live 30 minutes; its refresh tokens are single-use and every refresh returns
a new one (the old one stays usable for a 30-minute grace period in case the answer is lost).
Every refresh runs inside the hub's :class:`~kiki_billing.plugin.CredentialStore` ``update``: under
the account's lock (across threads and processes), the stored values are read again, the token
endpoint is called only if nobody refreshed meanwhile, and the new refresh token is stored before
the new access token is used. A process killed mid-refresh leaves the previous refresh token
stored, still inside its grace period; a second process waiting on the lock reads the new tokens
instead of spending the same refresh token.

Stored values (``credentials`` table of the ledger): ``access_token``, ``refresh_token``,
``expires_at`` (Unix seconds) and ``seed`` (a digest of the ``KIKI_XERO_REFRESH_TOKEN`` the chain
started from, so that a new seed in the environment is noticed, never the token itself).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kiki_billing.plugin import (
    CredentialStore,
    DeliveryError,
    TerminalError,
    TransientError,
    classify_http_status,
)

from .settings import XeroSettings
from .wire import decode_json, error_message

# NOTE: Xero access tokens expire after 30 minutes (developer.xero.com OAuth 2.0 FAQ); refresh
# 5 minutes early so that a slow step never starts with a token about to die.
REFRESH_EARLY = 300.0
TIMEOUT = (10.0, 60.0)


class XeroTokens:
    """The access token of one Xero connection, refreshed through the credential store.

    Args:
        settings: The adapter's settings (client id and secret, the seed, the token URL).
        store: Returns the current credential store (the hub sets it after construction).
        session: The HTTP session to call the token endpoint with.
        clock: Unix seconds (tests inject one).
    """

    def __init__(
        self,
        settings: XeroSettings,
        store: Callable[[], CredentialStore],
        session: Callable[[], Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._store = store
        self._session = session
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: Mapping[str, str] = {}
        self._refused: str | None = None
        self._refused_refresh: set[str] = set()
        self.refreshes = 0
        """Token endpoint calls made by this process (tests, logs)."""

    def _usable(self, values: Mapping[str, str]) -> bool:
        token = values.get("access_token")
        if not token or token == self._refused:
            return False
        try:
            expires_at = float(values.get("expires_at", "0"))
        except ValueError:
            return False
        return expires_at - REFRESH_EARLY > self.clock()

    def access_token(self) -> str:
        """A fresh access token: the cached one, the stored one, or a new one.

        Raises:
            TerminalError: No refresh token, or Xero refused it or the client credentials.
            TransientError: The token endpoint could not be reached or failed (5xx).
        """
        with self._lock:
            if self._usable(self._cached):
                return self._cached["access_token"]
        store = self._store()
        values = store.load()
        if not self._usable(values):
            spent: list[str] = []
            try:
                values = store.update(lambda current: self._refresh_unless_done(current, spent))
            except TerminalError as exc:
                raise self._lost_race(exc, spent, store) from None
        with self._lock:
            self._cached = dict(values)
        return values["access_token"]

    def refused(self, token: str) -> None:
        """Xero answered 401 to ``token``: the next :meth:`access_token` gets another one."""
        with self._lock:
            self._refused = token
            if self._cached.get("access_token") == token:
                self._cached = {}

    def forget(self) -> None:
        """Drop the cached token and any refusal (new tokens were stored by a connect)."""
        with self._lock:
            self._cached = {}
            self._refused = None

    def _lost_race(
        self, error: TerminalError, spent: list[str], store: CredentialStore
    ) -> DeliveryError:
        """A refused refresh token that another process has just replaced is worth a retry.

        The store's lock makes a second process wait and read the new tokens; should two
        refreshes still cross, the loser's spent token is refused while the winner's new one is
        already stored: the next attempt (the hub's retry) uses it instead of failing.
        """
        if error.code != "invalid_grant" or not spent:
            return error
        latest = store.load().get("refresh_token")
        if latest and latest != spent[-1]:
            return TransientError(
                "Xero refused a refresh token that another process had just rotated; the next "
                "attempt uses the new one",
                status=error.status,
                code=error.code,
            )
        with self._lock:
            first_refusal = spent[-1] not in self._refused_refresh
            self._refused_refresh.add(spent[-1])
        if first_refusal:
            # The winner of a crossing refresh may not have stored its tokens yet: one retry.
            return TransientError(
                "Xero refused the refresh token (invalid_grant); another process may be "
                "rotating it: trying once more",
                status=error.status,
                code=error.code,
            )
        return error

    def _refresh_unless_done(
        self, current: Mapping[str, str], spent: list[str]
    ) -> Mapping[str, str] | None:
        """The change run under the account's lock: ``None`` if someone else refreshed."""
        if self._usable(current):
            return None
        seed = self.settings.refresh_token
        fingerprint = self.settings.seed_fingerprint
        stored = current.get("refresh_token")
        if stored and (seed is None or current.get("seed") == fingerprint):
            refresh_token = stored
        elif seed is not None:
            # A new KIKI_XERO_REFRESH_TOKEN (a new connection): the chain starts again from it.
            refresh_token = seed.get_secret_value()
        else:
            raise TerminalError(
                "no Xero refresh token: run `kiki-billing connect xero`, or set "
                "KIKI_XERO_REFRESH_TOKEN to the first refresh token of the connection"
            )
        spent.append(refresh_token)
        granted = self.request_tokens(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )
        self.refreshes += 1
        return self.stored_values(granted, fallback_refresh=refresh_token)

    def stored_values(
        self, granted: Mapping[str, Any], *, fallback_refresh: str | None = None
    ) -> dict[str, str]:
        """What the store keeps of a token answer."""
        refresh = granted.get("refresh_token") or fallback_refresh
        if not granted.get("access_token") or not refresh:
            raise TerminalError("Xero's token endpoint answered without the tokens")
        expires_in = float(granted.get("expires_in") or 1800)
        return {
            "access_token": str(granted["access_token"]),
            "refresh_token": str(refresh),
            "expires_at": f"{self.clock() + expires_in:.0f}",
            "seed": self.settings.seed_fingerprint,
        }

    def request_tokens(self, form: Mapping[str, str]) -> Mapping[str, Any]:
        """POST the token endpoint (HTTP Basic with the client id and secret).

        Raises:
            TerminalError: ``invalid_grant`` (the refresh token or code is spent or revoked),
                ``invalid_client`` (wrong client id or secret), any other 4xx.
            TransientError: No answer, or a 5xx.
        """
        import requests

        settings = self.settings
        try:
            response = self._session().post(
                settings.token_url,
                data=dict(form),
                auth=(settings.client_id, settings.client_secret.get_secret_value()),
                headers={"Accept": "application/json"},
                timeout=TIMEOUT,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise TransientError(
                f"Xero's token endpoint could not be reached: {type(exc).__name__}"
            ) from None
        try:
            body = decode_json(response.content)
        except ValueError:
            body = None
        if response.status_code == 200 and isinstance(body, Mapping):
            return body
        raise token_error(response.status_code, body, response.headers)


def token_error(status: int, body: Any, headers: Mapping[str, str]) -> DeliveryError:
    """A refused token request, described without any token (only the OAuth error code)."""
    message, code = error_message(body, f"Xero's token endpoint answered HTTP {status}")
    # NOTE: only "error"/"error_description" of the body are read (RFC 6749 section 5.2); a
    # token endpoint's body is never copied into a message.
    if code == "invalid_grant":
        return TerminalError(
            "Xero refused the refresh token (invalid_grant): it was spent more than 30 minutes "
            "ago or the connection was revoked; run `kiki-billing connect xero` or set a new "
            "KIKI_XERO_REFRESH_TOKEN",
            status=status,
            code=code,
        )
    if code in ("invalid_client", "unauthorized_client"):
        return TerminalError(
            f"Xero refused the app ({code}): check KIKI_XERO_CLIENT_ID and KIKI_XERO_CLIENT_SECRET",
            status=status,
            code=code,
        )
    return classify_http_status(
        status, f"Xero token endpoint: {message}", headers=headers, code=code
    )
