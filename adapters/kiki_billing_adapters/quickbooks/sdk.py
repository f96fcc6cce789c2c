"""The SDKs, imported once under a lock the first time any thread needs them.

NOTE: the hub runs up to 10 deliveries of a realm in threads, which all reach their first
request at once; importing requests / python-quickbooks / intuit-oauth from several threads at
once can hand one of them a partially initialized module ("cannot import name
'parse_dict_header' from partially initialized module 'requests.utils'").
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_loaded = False


def load_sdks() -> None:
    """Import requests, python-quickbooks and intuit-oauth (serialized across threads)."""
    global _loaded
    if _loaded:
        return
    with _LOCK:
        if _loaded:
            return
        import intuitlib.client  # type: ignore[import-untyped]
        import intuitlib.enums  # type: ignore[import-untyped]
        import intuitlib.exceptions  # type: ignore[import-untyped]  # noqa: F401
        import quickbooks  # type: ignore[import-untyped]
        import quickbooks.exceptions  # type: ignore[import-untyped]  # noqa: F401
        import requests  # noqa: F401

        _loaded = True
