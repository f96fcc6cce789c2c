"""stripe-python's HTTP client on urllib3 directly, one connection pool for every thread.

stripe-python's default ``RequestsClient`` goes through a ``requests.Session`` for each call:
preparing the request, merging settings, hooks and cookies cost more CPU than the socket work
(profiled with ``bench/hub_cpu.py``: about a quarter of the hub's CPU per Stripe invoice).
Stripe needs none of it: the SDK builds the URL, headers and body itself. This client hands
them to a urllib3 pool as they are, verifies TLS with the SDK's own CA bundle, never follows a
redirect and never retries (the hub does, with the same key), and raises the SDK's
``APIConnectionError`` for anything that went wrong on the way, as ``RequestsClient`` does.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 80.0
"""Seconds; stripe-python's ``RequestsClient`` waits 80 s for a response."""
POOL_SIZE = 64
"""Connections kept per host: one pool serves every worker thread of the account."""


def make_http_client(stripe: Any, api_base: str) -> Any:
    """A stripe-python ``HTTPClient`` on urllib3, with the proxy the environment names once.

    Args:
        stripe: The imported ``stripe`` module.
        api_base: Stripe's API base URL (its scheme and host choose the proxy, if any).
    """
    from urllib.request import getproxies, proxy_bypass

    import urllib3

    class Urllib3Client(stripe.HTTPClient):  # type: ignore[misc]
        name = "urllib3"

        def __init__(self, proxy: str | None) -> None:
            super().__init__(verify_ssl_certs=True)
            options: dict[str, Any] = {
                "maxsize": POOL_SIZE,
                "cert_reqs": "CERT_REQUIRED",
                "ca_certs": stripe.ca_bundle_path,
                "timeout": urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
                "retries": False,
            }
            self._pool: Any = (
                urllib3.ProxyManager(proxy, **options)
                if proxy
                else urllib3.PoolManager(num_pools=4, **options)
            )

        def request(
            self,
            method: str,
            url: str,
            headers: Mapping[str, str] | None,
            post_data: Any = None,
        ) -> tuple[bytes, int, Mapping[str, str]]:
            try:
                # urlopen, not request: the SDK encoded the body; nothing may re-encode it.
                response = self._pool.urlopen(
                    method.upper(),
                    url,
                    body=post_data or None,
                    headers=dict(headers or {}),
                    redirect=False,
                    preload_content=True,
                )
            except Exception as exc:
                raise _connection_error(stripe, urllib3, exc) from exc
            return response.data, response.status, response.headers

        def request_stream(self, *_args: Any, **_kwargs: Any) -> Any:
            raise NotImplementedError("kiki-billing never streams from Stripe")

        def close(self) -> None:
            self._pool.clear()

    parts = urlsplit(api_base)
    proxy = None
    if parts.hostname and not proxy_bypass(parts.hostname):
        proxy = getproxies().get(parts.scheme)
    return Urllib3Client(proxy)


def _connection_error(stripe: Any, urllib3: Any, exc: Exception) -> Exception:
    """The SDK's ``APIConnectionError`` for a failure on the way, as ``RequestsClient`` words it."""
    errors = urllib3.exceptions
    # A certificate that does not verify is not retried; a timeout or a dropped connection is.
    should_retry = not isinstance(exc, errors.SSLError) and isinstance(
        exc, (errors.HTTPError, OSError)
    )
    message = textwrap.fill(
        "Unexpected error communicating with Stripe.  If this problem persists, let us know "
        "at support@stripe.com."
    )
    detail = f"{type(exc).__name__}: {exc}"
    error: Exception = stripe.APIConnectionError(
        f"{message}\n\n(Network error: {detail})", should_retry=should_retry
    )
    return error
