"""A synchronous client for an ASGI app in this process (httpx's ASGI transport).

Each request runs the app on a fresh event loop: no socket, no server, no timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx


class AsgiClient:
    """``post`` / ``get`` against an ASGI app, as a provider's webhook call would arrive."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                return await c.request(method, path, content=content, headers=dict(headers or {}))

        return asyncio.run(send())

    def post(
        self, path: str, *, content: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        return self.request("POST", path, content=content, headers=headers)

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)
