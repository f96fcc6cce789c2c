"""Who holds a delivery: a process named ``host:pid:start``, and whether it still runs."""

from __future__ import annotations

import os
import socket


def process_owner() -> str:
    """``host:pid:start`` of this process: names who holds a delivery."""
    return f"{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid())}"


def worker_owner(node: str) -> str:
    """``node:pid:start`` of a Celery worker process, ``node`` being its ``name@host``.

    The node name never equals a host name, so :func:`owner_is_dead` never declares a worker's
    claim dead from this host's process table: worker processes live in containers and on
    other machines, and only their lease running out frees what they held.
    """
    return f"{node}:{os.getpid()}:{process_start(os.getpid())}"


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("Z" for a zombie, "0" if unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return "Z" if fields[0] == b"Z" else fields[19].decode()
    except (OSError, IndexError):
        return "0"


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` is a process of this host that no longer runs.

    A holder on another host is never known dead here: only its lease running out frees it.
    An owner may carry more after ``host:pid:start`` (a thread, for locks held per thread).
    """
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    start = start.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return process_start(pid) != start


def owner_host(owner: str | None) -> str | None:
    """The host part of an owner, or ``None``."""
    return owner.partition(":")[0] if owner else None
