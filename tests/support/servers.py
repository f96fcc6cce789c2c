"""Helpers for tests that start a real server binary on 127.0.0.1.

A missing binary skips the test with the command that installs it, unless
``KIKI_REQUIRE_SERVERS=1`` is set (as ``.ci/run`` does), in which case it fails.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

REQUIRE_SERVERS = os.environ.get("KIKI_REQUIRE_SERVERS") == "1"


def find_binary(name: str, install_hint: str, extra_dirs: tuple[str, ...] = ()) -> str:
    """Return the path of ``name`` or skip (fail under KIKI_REQUIRE_SERVERS=1)."""
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed; install it with: {install_hint}"
    if REQUIRE_SERVERS:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
