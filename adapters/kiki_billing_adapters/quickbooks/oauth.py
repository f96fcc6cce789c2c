"""OAuth 2.0 with Intuit through intuit-oauth, without its network-bound constructor.

Access tokens last an hour; refresh tokens rotate (the old one stops working once a new one is
issued). A refresh happens inside the hub's credential store (:meth:`CredentialStore.update`:
a per-account lock across threads and processes), which stores the new tokens before the access
token is used, so a second process waiting on the lock reads them instead of spending the same
refresh token, and a process killed after the store never strands the account.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import structlog

from kiki_billing.plugin import CredentialStore, TerminalError

from .sdk import load_sdks
from .settings import AUTHORIZATION_URL, REVOKE_URL, QuickBooksSettings

if TYPE_CHECKING:
    from intuitlib.client import AuthClient  # type: ignore[import-untyped]

ACCESS_TOKEN = "access_token"  # noqa: S105 (a key name)
REFRESH_TOKEN = "refresh_token"  # noqa: S105 (a key name)
EXPIRES_AT = "expires_at"
REFRESH_EXPIRES_AT = "refresh_expires_at"
SEED = "seed"
"""A digest of the ``KIKI_QUICKBOOKS_REFRESH_TOKEN`` the stored chain started from."""
# NOTE: refreshed 5 minutes before Intuit's 1-hour expiry, so a request never leaves with a
# token about to lapse (and a clock a little off does not matter).
REFRESH_MARGIN = 300.0
SCOPE = "com.intuit.quickbooks.accounting"
TOKEN_TIMEOUT = (10.0, 30.0)
"""Connect and read timeouts of the token endpoint; well under the store's 60 s lock lease."""

log = structlog.get_logger("kiki_billing.adapters.quickbooks")


@cache
def _auth_client_class() -> type[AuthClient]:
    load_sdks()
    from intuitlib.client import AuthClient

    class EndpointAuthClient(AuthClient):  # type: ignore[misc]
        """intuit-oauth's client with its endpoints given: no discovery document is fetched.

        NOTE: ``AuthClient.__init__`` downloads Intuit's OpenID discovery document over the
        network (intuit-oauth 1.2.6 ``get_discovery_doc``); this sets the same attributes from
        the settings instead.
        """

        def __init__(
            self,
            client_id: str,
            client_secret: str,
            redirect_uri: str,
            environment: str,
            *,
            token_endpoint: str,
        ) -> None:
            import requests

            requests.Session.__init__(self)
            self.client_id = client_id
            self.client_secret = client_secret
            self.redirect_uri = redirect_uri
            self.environment = environment
            self.state_token = None
            self.auth_endpoint = AUTHORIZATION_URL
            self.token_endpoint = token_endpoint
            self.revoke_endpoint = REVOKE_URL
            self.issuer_uri = None
            self.jwks_uri = None
            self.user_info_url = None
            self.realm_id = None
            self.access_token = None
            self.expires_in = None
            self.refresh_token = None
            self.x_refresh_token_expires_in = None
            self.id_token = None

        def request(self, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", TOKEN_TIMEOUT)
            return super().request(method, url, *args, **kwargs)

    return EndpointAuthClient


def auth_client(settings: QuickBooksSettings, redirect_uri: str = "") -> AuthClient:
    """An intuit-oauth client for the settings' app and token endpoint (no network)."""
    cls: Any = _auth_client_class()
    client: AuthClient = cls(
        settings.client_id.get_secret_value(),
        settings.client_secret.get_secret_value(),
        redirect_uri,
        settings.environment,
        token_endpoint=settings.token_url,
    )
    return client


def granted(client: AuthClient, now: float, seed: str) -> dict[str, str]:
    """What to store after the token endpoint answered ``client``'s request."""
    if not client.access_token or not client.refresh_token:
        raise TerminalError("QuickBooks' token endpoint answered without tokens")
    expires_in = float(client.expires_in or 3600)
    refresh_in = float(client.x_refresh_token_expires_in or 0)
    values = {
        ACCESS_TOKEN: str(client.access_token),
        REFRESH_TOKEN: str(client.refresh_token),
        EXPIRES_AT: f"{now + expires_in:.0f}",
        SEED: seed,
    }
    if refresh_in:
        values[REFRESH_EXPIRES_AT] = f"{now + refresh_in:.0f}"
    return values


class TokenKeeper:
    """The account's access token: from memory, the credential store, or a refresh.

    Args:
        settings: The adapter's settings (app credentials, seed refresh token).
        store: Returns the hub's credential store (it is attached after construction).
        clock: Epoch seconds (tests inject one).
    """

    def __init__(
        self,
        settings: QuickBooksSettings,
        store: Callable[[], CredentialStore],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._current: tuple[str, float] | None = None
        self._refused: set[str] = set()
        self._seen: set[str] = set()
        self.refreshes = 0
        """Token-endpoint calls this process made (tests and counters)."""

    # The hub's view ----------------------------------------------------------------------------

    def access_token(self) -> str:
        """A usable access token, refreshed (and stored) first if needed.

        Raises:
            TerminalError: No refresh token is known, or the endpoint answered without tokens.
            intuitlib.exceptions.AuthClientError: The token endpoint refused (classified).
        """
        with self._lock:
            current = self._current
            if current is not None and self._usable(current[0], current[1]):
                return current[0]
        stored = self._store().load()
        if not self._needs_refresh(stored):
            return self._remember(stored)
        # The store's update runs under the account's lock in the ledger, across threads,
        # processes and hosts: a second process waits and reads the tokens the first stored.
        return self._remember(self._store().update(self._refresh_unless_done))

    def refused(self, token: str) -> None:
        """QuickBooks answered 401 to ``token``: the next request refreshes it first."""
        with self._lock:
            self._refused.add(token)
            if self._current is not None and self._current[0] == token:
                self._current = None

    def seen(self) -> set[str]:
        """Every token this process used or stored (for scrubbing messages)."""
        with self._lock:
            return set(self._seen)

    # Storing a new grant (the authorization-code flow) --------------------------------------------

    def store_grant(self, client: AuthClient) -> None:
        """Keep the tokens ``client`` just obtained (replacing whatever was stored)."""
        values = granted(client, self._clock(), self.settings.seed_fingerprint())
        with self._lock:
            self._seen.update((values[ACCESS_TOKEN], values[REFRESH_TOKEN]))
        self._remember(self._store().update(lambda _current: values))

    # Internals ------------------------------------------------------------------------------

    def _usable(self, token: str, expires_at: float) -> bool:
        return token not in self._refused and expires_at - self._clock() > REFRESH_MARGIN

    def _needs_refresh(self, stored: Mapping[str, str]) -> bool:
        seed = self.settings.seed_fingerprint()
        if seed and stored.get(SEED) != seed:
            return True  # a new KIKI_QUICKBOOKS_REFRESH_TOKEN starts a new chain
        token = stored.get(ACCESS_TOKEN)
        if not token:
            return True
        with self._lock:
            return not self._usable(token, _float(stored.get(EXPIRES_AT)))

    def _refresh_unless_done(self, current: Mapping[str, str]) -> Mapping[str, str] | None:
        """Under the account's lock: ``None`` if another thread or process refreshed already."""
        if not self._needs_refresh(current):
            return None
        seed = self.settings.seed_fingerprint()
        from_env = bool(seed) and current.get(SEED) != seed
        refresh = current.get(REFRESH_TOKEN)
        if from_env or not refresh:
            env = self.settings.refresh_token
            refresh = env.get_secret_value() if env is not None else None
        if not refresh:
            raise TerminalError(
                "no QuickBooks refresh token: set KIKI_QUICKBOOKS_REFRESH_TOKEN, or run "
                "`kiki-billing connect quickbooks`"
            )
        client = auth_client(self.settings)
        with self._lock:
            self._seen.add(refresh)
            self.refreshes += 1
        client.refresh(refresh_token=refresh)
        values = granted(client, self._clock(), seed or current.get(SEED, ""))
        with self._lock:
            self._seen.update((values[ACCESS_TOKEN], values[REFRESH_TOKEN]))
        log.info(
            "quickbooks.token_refreshed",
            account=self.settings.account_id,
            expires_at=values[EXPIRES_AT],
            chain="new" if from_env else "stored",
        )
        return values

    def _remember(self, values: Mapping[str, str]) -> str:
        token = values.get(ACCESS_TOKEN)
        if not token:
            raise TerminalError("no QuickBooks access token was stored")
        with self._lock:
            self._seen.add(token)
            self._current = (token, _float(values.get(EXPIRES_AT)))
        return token


def _float(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0
