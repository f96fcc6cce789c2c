"""Rotating provider credentials, kept in the ledger database under a per-account lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from kiki_billing.hub.ledger import Ledger, process_owner
from kiki_billing.hub.ratelimit import catch_up_held_slot
from kiki_billing.logging import register_secrets

_THREAD_LOCKS: dict[tuple[str, str, str], threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class LedgerCredentialStore:
    """A :class:`kiki_billing.plugin.CredentialStore` in the ledger's ``credentials`` table.

    :meth:`update` holds a thread lock and the ledger's ``account_locks`` row of the account
    (a lease, so a holder that dies frees it), reads the stored values, lets the adapter
    refresh, and stores the result in one transaction before returning it. A second process
    waiting for the lock then reads the new values instead of spending the same refresh token.

    Args:
        ledger: The ledger.
        target: The adapter name.
        account: The provider account.
        lock_seconds: How long a refresh may take before its lock is considered abandoned.
        wait_seconds: How long to wait for another process's refresh.
    """

    def __init__(
        self,
        ledger: Ledger,
        target: str,
        account: str,
        *,
        lock_seconds: float = 60.0,
        wait_seconds: float = 120.0,
    ) -> None:
        self.ledger = ledger
        self.target = target
        self.account = account
        self.lock_seconds = lock_seconds
        self.wait_seconds = wait_seconds
        key = (ledger.url, target, account)
        with _THREAD_LOCKS_GUARD:
            self._thread_lock = _THREAD_LOCKS.setdefault(key, threading.Lock())

    def load(self) -> Mapping[str, str]:
        """The stored values."""
        return self.ledger.load_credentials(self.target, self.account)

    def update(
        self, change: Callable[[Mapping[str, str]], Mapping[str, str] | None]
    ) -> Mapping[str, str]:
        """Call ``change(current)`` under the account's lock and store what it returns.

        Called from inside a request's rate slot, the request then takes a new slot if the
        wait outlasted its own (:func:`~kiki_billing.hub.ratelimit.catch_up_held_slot`).

        Raises:
            TimeoutError: Another process held the lock for longer than ``wait_seconds``.
            RateLimitedError: The new slot is further away than the limiter waits.
        """
        owner = f"{process_owner()}:{threading.get_ident()}"
        with self._thread_lock:
            deadline = time.monotonic() + self.wait_seconds
            while not self.ledger.lock_account(self.target, self.account, owner, self.lock_seconds):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.target} account {self.account}: credentials locked by another "
                        "process for too long"
                    )
                time.sleep(0.05)
            try:
                current = self.load()
                new = change(current)
                if new is not None:
                    register_secrets(v for k, v in new.items() if "token" in k or "secret" in k)
                    self.ledger.store_credentials(self.target, self.account, new)
            finally:
                self.ledger.unlock_account(self.target, self.account, owner)
        # NOTE: the request that needed the credentials waited here (for the lock, the token
        # endpoint) inside the rate slot it reserved; sent now, it would leave together with
        # the requests of later slots, and a provider counting a sliding window (QuickBooks:
        # 10/s) answers 429 and stalls the account for a minute.
        catch_up_held_slot()
        return current if new is None else dict(new)
