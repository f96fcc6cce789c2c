"""Rate limits and circuit breakers shared by every worker process of every machine, in Redis.

The Celery executor runs deliveries in many processes on many hosts at once; a provider still
sees one account. :class:`RedisLimits` keeps what :class:`~kiki_billing.hub.ratelimit.
LocalLimiterState` keeps in one process (the sliding windows, the even pace, the 429 pause and
slow-down, the concurrency cap) and what :class:`~kiki_billing.hub.ratelimit.CircuitBreaker`
keeps, in Redis, with the same rules, so that 4 workers together stay under Stripe's 100/s or
Xero's 60/min and 5 in flight.

Why it holds across processes:

- every read-decide-write is one Lua script, and Redis runs a script atomically: two workers
  never both take the last slot of a window;
- every time is Redis's own clock (``TIME`` inside the script), never a worker's: hosts whose
  clocks differ still count the same window. A worker sleeps the *duration* the script hands
  back, which its own clock measures well enough; the headroom covers the network's jitter;
- a concurrency slot is a lease (a sorted-set member scored with its expiry), renewed every
  third of its lease by the process that holds it. A worker killed with a request in flight
  stops renewing, and its slot frees itself when the lease runs out;
- the breaker's trial delivery is a lease too, so a worker that dies during the trial does not
  keep the account's circuit half-open for ever.

Keys of one account share a Redis Cluster hash tag (``{target:account}``), so each script
touches one slot.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kiki_billing.hub.ratelimit import (
    FLOOR,
    RECOVER_AFTER,
    RECOVER_STEP,
    SLOWDOWN,
    PacedWindow,
    paced_windows,
    too_far,
)
from kiki_billing.plugin import RateLimit, TransientError

# NOTE: times in Redis are seconds since this epoch, not since 1970: Lua numbers are doubles
# and Redis formats them with 14 significant digits, which would keep only 0.1 ms of a 1970
# timestamp but keeps a microsecond of this one for three years.
EPOCH = 1_700_000_000

_NOW = """
local _t = redis.call('TIME')
local now = (tonumber(_t[1]) - EPOCH) + tonumber(_t[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
""".replace("EPOCH", str(EPOCH))

_RESERVE = (
    _NOW
    + """
-- KEYS: sent (sorted set of reserved send times), state (hash: last, pace, paused_until,
-- since_throttle, seq). ARGV: max_wait, recover_after, recover_step, n, then n windows as
-- (requests, seconds, name), shortest first. Returns {reserved, wait, reason}.
local max_wait = tonumber(ARGV[1])
local recover_after = tonumber(ARGV[2])
local recover_step = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local st = redis.call('HMGET', KEYS[2], 'last', 'pace', 'paused_until', 'since_throttle')
local pace = tonumber(st[2]) or 1.0
local since = tonumber(st[4]) or 0
local interval = tonumber(ARGV[6]) / (tonumber(ARGV[5]) * pace)
local due = now
local reason = ''
if st[1] and tonumber(st[1]) + interval > due then due = tonumber(st[1]) + interval end
if st[3] and tonumber(st[3]) > due then due = tonumber(st[3]) end
if st[3] and tonumber(st[3]) > now then reason = 'paused' end
local longest = 0
for i = 0, n - 1 do
  local requests = tonumber(ARGV[5 + 3 * i])
  local seconds = tonumber(ARGV[6 + 3 * i])
  if seconds > longest then longest = seconds end
  local count = redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now - seconds), '+inf')
  if count >= requests then
    -- The window's sends are the newest `count` members: the one `requests` from the end
    -- must leave the window before another may be sent (a millisecond past it, as locally).
    local entry = redis.call('ZRANGE', KEYS[1], -requests, -requests, 'WITHSCORES')
    local free_at = tonumber(entry[2]) + seconds + 0.001
    if free_at > due then
      due = free_at
      reason = ARGV[7 + 3 * i]
    end
  end
end
local wait = due - now
if wait > max_wait then return {0, fmt(wait), reason} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - longest))
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('ZADD', KEYS[1], fmt(due), tostring(seq))
since = since + 1
if pace < 1.0 and since % recover_after == 0 then pace = math.min(1.0, pace + recover_step) end
redis.call('HSET', KEYS[2], 'last', fmt(due), 'pace', fmt(pace), 'since_throttle', since)
local ttl = math.ceil((longest + wait + 3600) * 1000)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, fmt(wait), reason}
"""
)

_THROTTLED = (
    _NOW
    + """
-- KEYS: state. ARGV: retry_after ('' when the provider sent none), slowdown, floor,
-- requests and seconds of the shortest window. Returns the wait before a retry.
local st = redis.call('HMGET', KEYS[1], 'pace', 'paused_until')
local paused = tonumber(st[2])
redis.call('HSET', KEYS[1], 'since_throttle', 0)
local wait
if ARGV[1] ~= '' then
  wait = tonumber(ARGV[1])
else
  local pace = math.max(tonumber(ARGV[3]), (tonumber(st[1]) or 1.0) * tonumber(ARGV[2]))
  redis.call('HSET', KEYS[1], 'pace', fmt(pace))
  -- The window frees a slot within one interval: wait that long, not a backoff.
  wait = tonumber(ARGV[5]) / (tonumber(ARGV[4]) * pace)
end
if paused == nil or now + wait > paused then
  redis.call('HSET', KEYS[1], 'paused_until', fmt(now + wait))
end
return fmt(wait)
"""
)

_TAKE_SLOT = (
    _NOW
    + """
-- KEYS: slots (sorted set: holder token -> lease expiry), state (hash: cap, cap_ok).
-- ARGV: published cap, token, lease seconds, recover_after. The cap in force is lower after a
-- provider refused a request for too many at once, and wins one slot back every
-- recover_after slots taken.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local max_cap = tonumber(ARGV[1])
local cap = math.min(tonumber(redis.call('HGET', KEYS[2], 'cap')) or max_cap, max_cap)
if redis.call('ZCARD', KEYS[1]) < cap then
  redis.call('ZADD', KEYS[1], fmt(now + tonumber(ARGV[3])), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000) + 60000)
  if cap < max_cap then
    local ok = redis.call('HINCRBY', KEYS[2], 'cap_ok', 1)
    if ok % tonumber(ARGV[4]) == 0 then redis.call('HSET', KEYS[2], 'cap', cap + 1) end
  end
  return 1
end
return 0
"""
)

_CROWDED = (
    _NOW
    + """
-- KEYS: slots, state. ARGV: published cap. One slot fewer than are held now (at least one).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local max_cap = tonumber(ARGV[1])
local cap = math.min(tonumber(redis.call('HGET', KEYS[2], 'cap')) or max_cap, max_cap)
local lowered = math.max(1, math.min(cap, redis.call('ZCARD', KEYS[1]) - 1))
redis.call('HSET', KEYS[2], 'cap', lowered, 'cap_ok', 0)
return lowered
"""
)

_RENEW_SLOTS = (
    _NOW
    + """
-- KEYS: slots of one account. ARGV: lease seconds, then the tokens this process holds there.
-- XX: a slot that expired meanwhile (the process stalled past its lease) is not revived.
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', fmt(now + tonumber(ARGV[1])), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000) + 60000)
return 1
"""
)

_BREAKER_ALLOW = (
    _NOW
    + """
-- KEYS: breaker (hash: failures, opened_at, trial_until). ARGV: cooldown, trial lease.
local h = redis.call('HMGET', KEYS[1], 'opened_at', 'trial_until')
if not h[1] then return 1 end
if h[2] and tonumber(h[2]) > now then return 0 end
if now - tonumber(h[1]) < tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'trial_until', fmt(now + tonumber(ARGV[2])))
return 1
"""
)

_BREAKER_FAILURE = (
    _NOW
    + """
-- KEYS: breaker. ARGV: threshold, seconds to keep the hash after the last failure.
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local trial = redis.call('HGET', KEYS[1], 'trial_until')
if trial or failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'opened_at', fmt(now))
end
redis.call('HDEL', KEYS[1], 'trial_until')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return failures
"""
)

SLOT_POLL = 0.02
"""Seconds between two tries for a concurrency slot (jittered)."""
BREAKER_MEMORY = 7 * 86400
"""Seconds a breaker's failures are kept after the last one."""


def _unreachable(exc: Exception) -> TransientError:
    return TransientError(
        f"the shared rate-limit store is unreachable ({type(exc).__name__}); nothing was sent",
        code="shared_limits_unreachable",
    )


class RedisLimits:
    """Limiter states and breakers of provider accounts, in Redis (one per worker process).

    Args:
        url: ``redis://`` or ``rediss://`` URL (the broker's when it is Redis).
        prefix: Prefix of every key (several deployments may share a Redis).
        slot_lease: Seconds a concurrency slot holds without renewal: after a worker dies,
            its slots free themselves within this time.
        trial_lease: Seconds the breaker's trial delivery holds the half-open circuit.
        client: A ready ``redis.Redis`` (tests); default: one from ``url``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "kiki",
        slot_lease: float = 15.0,
        trial_lease: float = 300.0,
        client: Any = None,
    ) -> None:
        if client is None:
            import redis

            client = redis.Redis.from_url(
                url, socket_timeout=10, socket_connect_timeout=10, health_check_interval=30
            )
        self.redis = client
        self.prefix = prefix
        self.slot_lease = slot_lease
        self.trial_lease = trial_lease
        self.reserve_script = client.register_script(_RESERVE)
        self.throttled_script = client.register_script(_THROTTLED)
        self.take_slot_script = client.register_script(_TAKE_SLOT)
        self.crowded_script = client.register_script(_CROWDED)
        self.renew_script = client.register_script(_RENEW_SLOTS)
        self.allow_script = client.register_script(_BREAKER_ALLOW)
        self.failure_script = client.register_script(_BREAKER_FAILURE)
        self._held: dict[str, set[str]] = {}
        self._held_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._tokens = itertools.count(1)
        self._me = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"

    def key(self, target: str, account: str, part: str) -> str:
        """The Redis key of one part of an account's state."""
        return f"{self.prefix}:{{{target}:{account}}}:{part}"

    def limiter_state(self, target: str, account: str, limit: RateLimit) -> RedisLimiterState:
        """The shared state of the account's limiter."""
        return RedisLimiterState(self, target, account, limit)

    def breaker(
        self, target: str, account: str, *, threshold: int, cooldown: float
    ) -> RedisCircuitBreaker:
        """The shared circuit breaker of the account."""
        return RedisCircuitBreaker(self, self.key(target, account, "breaker"), threshold, cooldown)

    # Concurrency slots: leases renewed by this process ---------------------------------------

    def take_slot(self, slots_key: str, state_key: str, cap: int) -> str | None:
        """Take a slot now; the token that releases it, or ``None`` when full.

        At most ``cap`` are held at once, fewer while the account is crowded.
        """
        token = f"{self._me}:{next(self._tokens)}"
        try:
            taken = self.take_slot_script(
                keys=[slots_key, state_key], args=[cap, token, self.slot_lease, RECOVER_AFTER]
            )
        except Exception as exc:
            raise _unreachable(exc) from exc
        if not taken:
            return None
        with self._held_lock:
            self._held.setdefault(slots_key, set()).add(token)
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(
                    target=self._renew, name="kiki-slot-keeper", daemon=True
                )
                self._keeper.start()
        return token

    def release_slot(self, slots_key: str, token: str) -> None:
        """Give a slot back (a failure to reach Redis leaves it to its lease)."""
        with self._held_lock:
            self._held.get(slots_key, set()).discard(token)
        with contextlib.suppress(Exception):  # unreachable: the lease frees it
            self.redis.zrem(slots_key, token)

    def _renew(self) -> None:
        while True:
            time.sleep(self.slot_lease / 3)
            with self._held_lock:
                held = {key: sorted(tokens) for key, tokens in self._held.items() if tokens}
            for key, tokens in held.items():
                try:
                    self.renew_script(keys=[key], args=[self.slot_lease, *tokens])
                except Exception:  # noqa: S112 - retried next period; the lease is 3 periods
                    continue


class RedisLimiterState:
    """One account's limiter state in Redis: the rules of the local one, across processes."""

    def __init__(self, limits: RedisLimits, target: str, account: str, limit: RateLimit) -> None:
        self.limits = limits
        self.windows: list[PacedWindow] = paced_windows(limit)
        self.concurrency = max(1, limit.concurrency)
        self.sent_key = limits.key(target, account, "sent")
        self.state_key = limits.key(target, account, "limiter")
        self.slots_key = limits.key(target, account, "slots")
        self.sleep: Callable[[float], None] = time.sleep
        self._window_args: list[object] = []
        for window in self.windows:
            self._window_args += [window.requests, window.seconds, window.name or ""]

    @property
    def interval(self) -> float:
        """Seconds between two requests at the account's current pace (shared)."""
        shortest = self.windows[0]
        try:
            pace = self.limits.redis.hget(self.state_key, "pace")
        except Exception as exc:
            raise _unreachable(exc) from exc
        return shortest.seconds / (shortest.requests * float(pace or 1.0))

    def reserve(self, max_wait: float) -> float:
        """Reserve the account's next send slot in Redis; the seconds until it comes due."""
        args = [max_wait, RECOVER_AFTER, RECOVER_STEP, len(self.windows), *self._window_args]
        try:
            reserved, wait_text, reason = self.limits.reserve_script(
                keys=[self.sent_key, self.state_key], args=args
            )
        except Exception as exc:
            raise _unreachable(exc) from exc
        wait = float(wait_text)
        if not reserved:
            raise too_far(wait, _text(reason) or None)
        return max(0.0, wait)

    def throttled(self, retry_after: float | None) -> float:
        """Pause (``retry_after``) or slow down every process's requests to the account."""
        shortest = self.windows[0]
        args = [
            "" if retry_after is None else repr(float(retry_after)),
            SLOWDOWN,
            FLOOR,
            shortest.requests,
            shortest.seconds,
        ]
        try:
            return float(self.limits.throttled_script(keys=[self.state_key], args=args))
        except Exception as exc:
            raise _unreachable(exc) from exc

    def crowded(self) -> None:
        """Every process holds one slot fewer than are held now (at least one)."""
        try:
            self.limits.crowded_script(
                keys=[self.slots_key, self.state_key], args=[self.concurrency]
            )
        except Exception as exc:
            raise _unreachable(exc) from exc

    @contextmanager
    def slot(self) -> Iterator[object]:
        """Hold one of the account's concurrent slots, counted across every process."""
        while True:
            token = self.limits.take_slot(self.slots_key, self.state_key, self.concurrency)
            if token is not None:
                break
            self.sleep(SLOT_POLL * (0.5 + random.random()))  # noqa: S311 - jitter
        try:
            yield token
        finally:
            self.limits.release_slot(self.slots_key, token)


class RedisCircuitBreaker:
    """An account's circuit breaker in Redis: failures of every worker open it for all."""

    def __init__(self, limits: RedisLimits, key: str, threshold: int, cooldown: float) -> None:
        self.limits = limits
        self.key = key
        self.threshold = threshold
        self.cooldown = cooldown

    def allow(self) -> bool:
        """May a delivery start now (at most one trial at a time once the cooldown ran)?"""
        return bool(
            self.limits.allow_script(keys=[self.key], args=[self.cooldown, self.limits.trial_lease])
        )

    def record_success(self) -> None:
        """A delivery went through: close the circuit for every worker."""
        self.limits.redis.delete(self.key)

    def record_failure(self) -> None:
        """A delivery failed for a reason that says the provider is unwell."""
        self.limits.failure_script(keys=[self.key], args=[self.threshold, BREAKER_MEMORY])

    @property
    def is_open(self) -> bool:
        """True while every worker defers the account's deliveries."""
        return bool(self.limits.redis.hexists(self.key, "opened_at"))

    def open_for(self) -> float | None:
        """Seconds until a trial delivery is let through; ``None`` while the circuit is closed."""
        opened_at = self.limits.redis.hget(self.key, "opened_at")
        if opened_at is None:
            return None
        seconds, micros = self.limits.redis.time()  # Redis's clock, as the scripts use
        now = seconds - EPOCH + micros / 1e6
        remaining: float = float(_text(opened_at)) + self.cooldown - now
        return max(0.0, remaining)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
