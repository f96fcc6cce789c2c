"""The shared limiter and breaker (Redis): the local rules, held across processes.

Every test runs against a real ``redis-server`` on 127.0.0.1 (skipped without the binary, a
failure under ``KIKI_REQUIRE_SERVERS=1``). Reservations are checked from the send times Redis
recorded, never from how long anything took.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kiki_billing.hub.ratelimit import (
    LOCAL_LIMIT,
    RECOVER_AFTER,
    AccountLimiter,
    LocalLimiterState,
)
from kiki_billing.hub.shared_limits import RedisLimits
from kiki_billing.plugin import RateLimit, RateLimitedError, RateWindow, TransientError
from tests.support.redis import redis_url  # noqa: F401

pytestmark = [pytest.mark.server, pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])]

TARGET, ACCOUNT = "stripe", "acct_shared"
STATE = "kiki-test:no-refusal"  # a state with no refusal recorded: the published cap holds
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> str:
    """The session's Redis server."""
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def limits(url: str, prefix: str, **kw: float) -> RedisLimits:
    return RedisLimits(url, prefix=prefix, **kw)


def sent_times(shared: RedisLimits) -> list[float]:
    entries = shared.redis.zrange(shared.key(TARGET, ACCOUNT, "sent"), 0, -1, withscores=True)
    return sorted(score for _member, score in entries)


def max_in_any_window(times: list[float], seconds: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


def reserve_many(url: str, prefix: str, count: int, windows: list[tuple[int, float]]) -> float:
    """In a separate process: reserve ``count`` slots of the shared account (not slept)."""
    shared = RedisLimits(url, prefix=prefix)
    limit = RateLimit(tuple(RateWindow(n, s) for n, s in windows), 4)
    state = shared.limiter_state(TARGET, ACCOUNT, limit)
    return sum(state.reserve(max_wait=3600) for _ in range(count))


def hold_slots(url: str, prefix: str, count: int, ready: str) -> None:
    """In a separate process: take ``count`` slots, say so, and hold them until killed."""
    shared = RedisLimits(url, prefix=prefix, slot_lease=2.0)
    slots = shared.key(TARGET, ACCOUNT, "slots")
    for _ in range(count):
        assert shared.take_slot(slots, STATE, count) is not None
    with open(ready, "w") as handle:
        handle.write("held")
    time.sleep(600)


def in_process(call: str) -> subprocess.Popen[bytes]:
    """Run ``call`` (a call of a function of this module) in a new Python process."""
    code = f"from tests.hub.test_shared_limits import *; {call}"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO)


def test_windows_are_counted_across_processes(server: str, prefix: str) -> None:
    windows = [(50, 1.0), (120, 5.0)]
    call = f"reserve_many({str(server)!r}, {prefix!r}, 60, {windows!r})"
    workers = [in_process(call) for _ in range(4)]
    assert [worker.wait(timeout=120) for worker in workers] == [0] * 4
    times = sent_times(limits(server, prefix))
    assert len(times) == 240
    # 4% headroom under each window, whichever process reserved the slot.
    assert max_in_any_window(times, 1.0) <= 48
    assert max_in_any_window(times, 5.0) <= 115
    # Evenly paced at the shortest window's rate, never a burst.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1 / 48 - 1e-5


def local_schedule(limit: RateLimit, count: int) -> list[float]:
    now = [0.0]
    state = LocalLimiterState(limit, clock=lambda: now[0])
    return [now[0] + state.reserve(3600) for _ in range(count)]


def test_the_shared_state_keeps_the_local_rules(server: str, prefix: str) -> None:
    """The same reservations give the same schedule in this process and in Redis."""
    limit = RateLimit((RateWindow(100, 1.0), RateWindow(150, 3.0)), 4)
    local = local_schedule(limit, 300)
    assert max_in_any_window(local, 1.0) == 96
    assert max_in_any_window(local, 3.0) == 144
    shared = limits(server, prefix)
    state = shared.limiter_state(TARGET, ACCOUNT, limit)
    for _ in range(300):
        state.reserve(3600)
    times = sent_times(shared)
    assert [t - times[0] for t in times] == pytest.approx(local, abs=1e-3)
    assert max_in_any_window(times, 1.0) == 96
    assert max_in_any_window(times, 3.0) == 144


def test_a_429_pauses_every_process(server: str, prefix: str) -> None:
    limit = RateLimit((RateWindow(100, 1.0),), 4)
    one = limits(server, prefix).limiter_state(TARGET, ACCOUNT, limit)
    other = limits(server, prefix).limiter_state(TARGET, ACCOUNT, limit)
    assert one.throttled(30.0) == 30.0
    with pytest.raises(RateLimitedError) as raised:
        other.reserve(max_wait=10)
    assert raised.value.code == LOCAL_LIMIT
    assert raised.value.window == "paused"
    wait = other.reserve(max_wait=60)
    assert 20 < wait <= 30


def test_a_bare_429_slows_every_process(server: str, prefix: str) -> None:
    limit = RateLimit((RateWindow(100, 1.0),), 4)
    one = limits(server, prefix).limiter_state(TARGET, ACCOUNT, limit)
    other = limits(server, prefix).limiter_state(TARGET, ACCOUNT, limit)
    assert other.interval == pytest.approx(1 / 96)
    wait = one.throttled(None)
    assert wait == pytest.approx(1 / (96 * 0.9), rel=1e-4)
    assert other.interval == pytest.approx(1 / (96 * 0.9))


def test_the_concurrency_cap_holds_across_processes_and_a_dead_holder_frees_its_slots(
    server: str, prefix: str, tmp_path: object
) -> None:
    ready = os.path.join(str(tmp_path), "ready")
    holder = in_process(f"hold_slots({str(server)!r}, {prefix!r}, 2, {ready!r})")
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        shared = limits(server, prefix, slot_lease=2.0)
        slots = shared.key(TARGET, ACCOUNT, "slots")
        assert shared.take_slot(slots, STATE, 2) is None  # both held by the live process
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        # Its renewals stop; within its lease the slots free themselves.
        deadline = time.monotonic() + 60
        token = None
        while token is None and time.monotonic() < deadline:
            token = shared.take_slot(slots, STATE, 2)
            time.sleep(0.05)
        assert token is not None
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)


def test_a_held_slot_is_renewed_past_its_lease(server: str, prefix: str) -> None:
    shared = limits(server, prefix, slot_lease=1.5)
    other = limits(server, prefix, slot_lease=1.5)
    slots = shared.key(TARGET, ACCOUNT, "slots")
    token = shared.take_slot(slots, STATE, 1)
    assert token is not None
    time.sleep(4.0)
    assert other.take_slot(slots, STATE, 1) is None
    shared.release_slot(slots, token)
    assert other.take_slot(slots, STATE, 1) is not None


def test_the_limiter_api_runs_on_the_shared_state(server: str, prefix: str) -> None:
    limit = RateLimit((RateWindow(1000, 1.0),), 2)
    slept: list[float] = []
    shared = limits(server, prefix)
    limiter = AccountLimiter(
        limit, sleep=slept.append, state=shared.limiter_state(TARGET, ACCOUNT, limit)
    )
    other = limits(server, prefix)
    slots = other.key(TARGET, ACCOUNT, "slots")
    with limiter.request(), limiter.request():
        assert other.take_slot(slots, STATE, 2) is None  # the cap of 2 is held by this process
    assert other.take_slot(slots, STATE, 2) is not None
    assert limiter.requests == 2
    assert len(sent_times(shared)) == 2


def test_the_breaker_is_shared(server: str, prefix: str) -> None:
    one = limits(server, prefix, trial_lease=1.0)
    two = limits(server, prefix, trial_lease=1.0)
    first = one.breaker(TARGET, ACCOUNT, threshold=3, cooldown=0.0)
    second = two.breaker(TARGET, ACCOUNT, threshold=3, cooldown=0.0)
    first.record_failure()
    second.record_failure()
    assert not first.is_open
    first.record_failure()
    assert first.is_open and second.is_open
    # Cooldown over: exactly one trial among all workers...
    assert [second.allow(), first.allow(), second.allow()] == [True, False, False]
    # ...until the trial's lease runs out (its worker died): then another.
    deadline = time.monotonic() + 30
    while not first.allow():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first.record_failure()  # the trial failed: open again
    assert second.is_open
    second.record_success()
    assert not first.is_open and first.allow()


def test_the_breaker_waits_out_its_cooldown(server: str, prefix: str) -> None:
    breaker = limits(server, prefix).breaker(TARGET, ACCOUNT, threshold=1, cooldown=3600)
    assert breaker.open_for() is None
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    remaining = breaker.open_for()
    assert remaining is not None and 3590 < remaining <= 3600


def test_an_unreachable_store_is_a_transient_error_before_anything_is_sent() -> None:
    from tests.support.servers import free_port

    shared = RedisLimits(f"redis://127.0.0.1:{free_port()}/0")
    state = shared.limiter_state(TARGET, ACCOUNT, RateLimit((RateWindow(10, 1.0),), 1))
    with pytest.raises(TransientError, match="unreachable"):
        state.reserve(10)


def test_a_refusal_for_too_many_at_once_lowers_every_process_cap(server: str, prefix: str) -> None:
    limit = RateLimit((RateWindow(1000, 1.0),), 4)
    one = limits(server, prefix).limiter_state(TARGET, ACCOUNT, limit)
    two = limits(server, prefix).limiter_state(TARGET, ACCOUNT, limit)
    other = limits(server, prefix)
    slots = other.key(TARGET, ACCOUNT, "slots")
    state = other.key(TARGET, ACCOUNT, "limiter")
    with one.slot(), one.slot(), two.slot():
        two.crowded()  # the provider refused the third request in flight: two at once
        assert other.take_slot(slots, state, 4) is None
    held = [other.take_slot(slots, state, 4) for _ in range(3)]
    assert held[0] is not None and held[1] is not None and held[2] is None
    for token in held[:2]:
        assert token is not None
        other.release_slot(slots, token)
    # Every RECOVER_AFTER slots taken without a refusal win one back, up to the published cap.
    for _ in range(RECOVER_AFTER):
        token = other.take_slot(slots, state, 4)
        assert token is not None
        other.release_slot(slots, token)
    held = [other.take_slot(slots, state, 4) for _ in range(4)]
    assert [t is not None for t in held] == [True, True, True, False]
