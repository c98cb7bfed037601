"""What makes learning effectively once: the lease, the signed checkpoint, the outcomes tail.

    lease = Lease(redis, keys.lease("default"), ttl_s=5.0)
    if lease.try_acquire():                         # one active learner per model name
        state = load_checkpoint(redis, keys, "default", key)     # or None on a first start
        save_checkpoint(redis, keys, "default", lease, state, key)   # fenced by the lease

- The lease is a Redis key set with NX and a TTL, renewed by a background thread. A standby keeps
  trying to take it and becomes active when the active learner stops renewing (it died).
- A checkpoint is one signed blob (`registry.dumps_signed`): models, their statistics, the input
  offsets consumed, the labels still waiting, counters. Writing it is fenced: a learner that lost
  its lease can never overwrite its successor's checkpoint. Loading checks the signature before
  unpickling and raises `TamperedArtifact` (loudly) otherwise -- that check must never be skipped.
- Outcomes produced after the last checkpoint were already published when a learner crashes; the
  successor reads them back (`outcomes_since`) to re-learn those labels in the same order without
  publishing them twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
from confluent_kafka import TopicPartition

from driftline.shared import kafka
from driftline.shared.codec import DecodeError, get_codec
from driftline.shared.keys import Keys
from driftline.shared.registry import TamperedArtifact, dumps_signed, loads_signed
from driftline.shared.settings import Settings

from .champion import Roles
from .records import Control, Event, Label

log = logging.getLogger(__name__)
FORMAT = 2


@dataclass
class LearnerState:
    """What a checkpoint holds: everything needed to go on exactly where the learner was."""

    spec: str
    roles: Roles
    offsets: dict[tuple[str, int], int]  # (topic, partition) -> next offset to read
    outcomes_offset: int  # the outcomes topic's end when saved: what was published after it is replayed
    waiting: list[Label]  # labels read, not yet learned
    position: int  # champion labels learned
    clock: float  # event time of the latest scored event
    held_events: list[Event]  # events read, not yet scored
    held_control: list[Control]  # control records read, not yet applied
    label_ts_by_partition: dict[int, float] = field(default_factory=dict)

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_FENCED_SET = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[2], ARGV[2]) return 1 end
return 0
"""


class Lease:
    """One holder at a time for a Redis key; renewed in the background while held."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.r = client
        self.key = key
        self.ttl_ms = max(100, int(ttl_s * 1000))
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._renewing: threading.Thread | None = None
        self._stop = threading.Event()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.fenced_set = client.register_script(_FENCED_SET)

    def try_acquire(self) -> bool:
        if self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
            self.lost.clear()
            self._start_renewing()
            return True
        return False

    def renew(self) -> bool:
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        if not ok:
            self.lost.set()
        return ok

    def _start_renewing(self) -> None:
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.ttl_ms / 3000):
                try:
                    if not self.renew():
                        log.error("learner lease %s lost to another instance", self.key)
                        return
                except redis.RedisError:  # a blip: try again; the TTL covers a few misses
                    log.warning("lease renewal failed", exc_info=True)

        self._renewing = threading.Thread(target=loop, name="lease-renew", daemon=True)
        self._renewing.start()

    def release(self) -> None:
        self._stop.set()
        try:
            self._release(keys=[self.key], args=[self.token])
        except redis.RedisError:
            log.warning("lease release failed; it expires by itself", exc_info=True)


def save_checkpoint(client: redis.Redis, keys: Keys, model: str, lease: Lease, state: LearnerState,
                    signing_key: bytes) -> bool:
    """Write the checkpoint if (and only if) this learner still holds the lease."""
    blob = dumps_signed({"format": FORMAT, "saved_at": time.time(), "state": state}, signing_key)
    ok = bool(lease.fenced_set(keys=[lease.key, keys.checkpoint(model)], args=[lease.token, blob]))
    if not ok:
        lease.lost.set()
    return ok


def load_checkpoint(client: redis.Redis, keys: Keys, model: str, signing_key: bytes) -> LearnerState | None:
    """The latest checkpoint, None when there is none; TamperedArtifact when it is not ours (or of
    another format)."""
    blob = client.get(keys.checkpoint(model))
    if blob is None:
        return None
    try:
        state = loads_signed(blob, signing_key)
    except TamperedArtifact:
        log.error("REFUSED the checkpoint of model %s: its signature does not match (tampered, or "
                  "signed with another DRIFTLINE_MODEL_KEY); not loading it", model)
        raise
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TamperedArtifact(f"checkpoint format {state.get('format')!r} is not {FORMAT}")
    return state["state"]


def outcomes_since(settings: Settings, topic: str, offset: int, model: str, timeout_s: float = 15.0) -> list[dict]:
    """The outcomes of `model` published at or after `offset` of the single-partition outcomes
    topic, in order (read up to the high watermark as of now)."""
    c = kafka.consumer(settings, f"{topic}.tail.{uuid.uuid4().hex[:8]}", **{"isolation.level": "read_uncommitted"})
    codec = get_codec()
    out: list[dict] = []
    try:
        _low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10.0, cached=False)
        if high <= offset:
            return out
        c.assign([TopicPartition(topic, 0, offset)])
        deadline = time.monotonic() + timeout_s
        position = offset
        while position < high:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} [{offset}, {high}) in {timeout_s}s")
            for m in c.consume(num_messages=5000, timeout=0.5):
                if m.error() is not None:
                    continue
                position = m.offset() + 1
                try:
                    o = codec.decode(m.value(), expect="Outcome")
                except DecodeError:
                    continue
                if o["model"] == model:
                    out.append(o)
        return out
    finally:
        c.close()


def high_watermark(c, topic: str) -> int:
    """The end of partition 0 of `topic`, asked of the broker (not the consumer's cache)."""
    _low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10.0, cached=False)
    return high


