"""Shared test configuration: cassettes live in the top-level ``cassettes/<name>/`` folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests see the adapters of this package only, never stray plugins installed beside it; a test
# that installs a third-party adapter names its distribution too.
os.environ["KIKI_ADAPTER_PACKAGES"] = "kiki-billing"
CASSETTES = REPO / "cassettes"

# Headers that carry secrets or describe the recording host; never stored in a cassette.
SCRUBBED_REQUEST_HEADERS = [
    "Authorization",
    "X-Stripe-Client-User-Agent",
    "User-Agent",
    "Cookie",
    "xero-tenant-id",
]
SCRUBBED_RESPONSE_HEADERS = ["Set-Cookie"]


def _scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() in {h.lower() for h in SCRUBBED_RESPONSE_HEADERS}:
            del headers[name]
    return response


@pytest.fixture(scope="module")
def vcr_config() -> dict[str, Any]:
    """Scrub secrets from every cassette; replay strictly (every recorded request must match)."""
    return {
        "filter_headers": [(name, None) for name in SCRUBBED_REQUEST_HEADERS],
        "before_record_response": _scrub_response,
        "decode_compressed_response": True,
        "match_on": ["method", "scheme", "host", "port", "path", "query", "body"],
        "allow_playback_repeats": False,
    }


@pytest.fixture(scope="module")
def vcr_cassette_dir(request: pytest.FixtureRequest) -> str:
    """``cassettes/<topic>/`` where the test module is ``tests/.../test_<topic>.py``.

    A module may set ``CASSETTE_TOPIC`` to share a folder (e.g. ``"stripe"``).
    """
    topic = getattr(request.module, "CASSETTE_TOPIC", None)
    if topic is None:
        topic = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    return str(CASSETTES / topic)
