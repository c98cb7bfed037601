"""Riding out an outage of Redis or Kafka: what a service's loop depends on, whether it answers,
and a Redis client that waits for Redis to come back instead of failing.

    client = deps.redis_client(settings)     # for a worker loop: a command waits out an outage
    deps.status()                            # {"redis": "ok"} or {"redis": "unreachable for 12 s: ..."}

A worker's Redis command that meets a refused or dropped connection is retried with exponential
backoff (0.1 s doubling to 2 s, jittered: no busy loop) for up to OUTAGE_WAIT_S; the log says
once that the dependency went away, every 30 s that it is still away, and once that it is back
(no log flood). Past OUTAGE_WAIT_S the error is raised: the worker stops, /health answers 503
and the supervisor restarts the process. A retried command may run twice when Redis executed it
but the reply was lost: every worker write is idempotent (full-state HSET with its offset, SET of
a snapshot, a first-seen claim with the claimant's marker), which a crash needs anyway.

HTTP paths keep a plain client: a request must answer 503 at once, not wait for Redis. On a Redis
Cluster the same holds (`redis_clients`: a failover or a migration is waited out the same way).
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from . import redis_clients
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

OUTAGE_WAIT_S = 300.0  # how long a worker waits for a dependency before giving up (the issue asks for 60 s)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 2.0
REMIND_EVERY_S = 30.0


class Dependencies:
    """Which dependencies are away, since when and why (thread-safe; one per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, tuple[float, str]] = {}  # name -> (since, last error)
        self._reminded: dict[str, float] = {}

    def down(self, name: str, error: object) -> None:
        now = time.monotonic()
        with self._lock:
            first = name not in self._down
            since = self._down.get(name, (now, ""))[0]
            self._down[name] = (since, str(error)[:200])
            remind = not first and now - self._reminded.get(name, since) >= REMIND_EVERY_S
            if first or remind:
                self._reminded[name] = now
        if first:
            log.warning("%s unreachable (%s); waiting for it with backoff", name, error)
        elif remind:
            log.warning("%s still unreachable after %.0f s (%s)", name, now - since, error)

    def up(self, name: str) -> None:
        if name not in self._down:  # the hot path: no lock
            return
        with self._lock:
            since = self._down.pop(name, None)
            self._reminded.pop(name, None)

        if since is not None:
            log.warning("%s is back after %.1f s", name, time.monotonic() - since[0])

    def is_down(self, name: str) -> bool:
        return name in self._down

    def away_for(self, name: str) -> float:
        entry = self._down.get(name)
        return 0.0 if entry is None else time.monotonic() - entry[0]

    def status(self) -> dict[str, str]:
        """{name: "ok" | "unreachable for N s: error"} for every dependency seen so far."""
        now = time.monotonic()
        with self._lock:
            out = {name: "ok" for name in KNOWN}
            for name, (since, error) in self._down.items():
                out[name] = f"unreachable for {now - since:.0f} s: {error}"
        return out

    def missing(self) -> list[str]:
        """What a readiness probe reports: one line per dependency that is away."""
        return [f"{name} {state}" for name, state in self.status().items() if state != "ok"]


KNOWN = ("kafka", "redis")
DEPS = Dependencies()


def backoff_delays(first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S):
    """Exponential backoff with full jitter in its upper half, capped.

        >>> delays = backoff_delays()
        >>> d = [next(delays) for _ in range(8)]
        >>> 0.05 <= d[0] <= 0.1 and all(1.0 <= x <= 2.0 for x in d[5:])
        True
    """
    delay = first
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


class WaitOutOutage(Retry):
    """redis-py's Retry, by deadline instead of count: retries connection errors and timeouts
    with backoff until Redis answers or `wait_s` has passed, and tells DEPS."""

    def __init__(self, wait_s: float = OUTAGE_WAIT_S, name: str = "redis") -> None:
        super().__init__(NoBackoff(), -1, (RedisConnectionError, RedisTimeoutError, socket.timeout,
                                           ConnectionResetError, BrokenPipeError, *redis_clients.CLUSTER_OUTAGE))
        self.wait_s = wait_s
        self.name = name

    def call_with_retry(self, do: Callable[[], T], fail: Callable, is_retryable=None,
                        with_failure_count: bool = False) -> T:
        deadline = None
        delays = backoff_delays()
        failures = 0
        while True:
            try:
                result = do()
                DEPS.up(self.name)
                return result
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                now = time.monotonic()
                deadline = deadline or now + self.wait_s
                DEPS.down(self.name, error)
                if now >= deadline:
                    log.error("%s unreachable for %.0f s: giving up", self.name, DEPS.away_for(self.name))
                    raise
                time.sleep(min(next(delays), max(0.0, deadline - now)))


def redis_client(settings: Settings, wait_s: float = OUTAGE_WAIT_S) -> redis.Redis | RedisCluster:
    """A Redis client for a worker loop (one node or a cluster, as DRIFTLINE_REDIS_URL says):
    each command waits out an outage of up to `wait_s`."""
    return redis_clients.connect(settings.redis_url, wait=WaitOutOutage(wait_s),
                                 socket_connect_timeout=2.0, socket_timeout=30.0)
