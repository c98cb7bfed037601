"""What makes learning effectively once: the lease, the signed checkpoint, the outcomes tail.

    lease = Lease(redis, keys.lease("default"), ttl_s=5.0)
    if lease.try_acquire():                         # one active learner per model name
        state = load_checkpoint(redis, keys, "default", key)     # or None on a first start
        save_checkpoint(redis, keys, "default", lease, state, key)   # fenced by the lease

- The lease is a Redis key set with NX and a TTL, renewed by a background thread. A standby keeps
  trying to take it and becomes active when the active learner stops renewing (it died).
- A checkpoint is one signed blob (`registry.dumps_signed`) of a `LearnerState`: the roles (models,
  their statistics, the contest), the input offsets consumed, the labels and events still waiting,
  the position. A checkpoint of another `FORMAT` is refused, not converted. Writing it is fenced: a learner that lost
  its lease can never overwrite its successor's checkpoint. Loading checks the signature before
  unpickling and raises `TamperedArtifact` (loudly) otherwise -- that check must never be skipped.
- Outcomes produced after the last checkpoint were already published when a learner crashes; the
  successor reads them back (`outcomes_since`) and its `Replay` re-learns those labels in the same
  order without publishing them twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
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
    examples: list | None = None  # the warm-start buffer's rows (examples.py); None: written before it was here
    adaptation: dict | None = None  # the drift loop's policy and data-drift monitor (Adaptation.state)
    drift_events_offset: int | None = None  # drift.events' end when saved (None: written before it was here)

    # Behind a backlog tens of thousands of labels and events wait, and pickling them one object
    # at a time cost ~160 ms per 40,000 (~15% of the learner at full speed): they are kept as
    # columns of plain values instead (~5 ms), events as the bytes they were read as.
    def __getstate__(self) -> dict:
        state = {name: value for name, value in vars(self).items() if name not in ("waiting", "held_events")}
        state["waiting_columns"] = [list(column) for column in zip(*(
            (lb.event_id, lb.label, lb.ts, lb.seen, lb.raw, lb.key, lb.partition, lb.offset, lb.retry_at)
            for lb in self.waiting))] or [[]] * 9
        state["held_columns"] = [list(column) for column in zip(*(
            (e.event_id, e.ts, None if e.raw else e.vector, e.topic, e.partition, e.offset, e.seen, e.raw)
            for e in self.held_events))] or [[]] * 8
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("examples", None)
        state.setdefault("adaptation", None)
        state.setdefault("drift_events_offset", None)
        if "waiting_columns" in state:  # else a checkpoint written before the columns: objects as they are
            state = dict(state)
            state["waiting"] = [Label(*row) for row in zip(*state.pop("waiting_columns"))]
            codec = get_codec()
            state["held_events"] = [_event(codec, *row) for row in zip(*state.pop("held_columns"))]
        vars(self).update(state)


def _event(codec, event_id: str, ts: float, vector: dict | None, topic: str, partition: int, offset: int,
           seen: float, raw: bytes) -> Event:
    return Event(event_id, ts, codec.decode(raw, expect="FeatureVector") if raw else vector, topic, partition,
                 offset, seen, raw)


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
                        log.error("learner lease %s lost: another instance holds it, or it ran out while Redis "
                                  "was away (a failover of its shard)", self.key)
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
    return records_since(settings, topic, offset, "Outcome", model, timeout_s)


def records_since(settings: Settings, topic: str, offset: int, record: str, model: str,
                  timeout_s: float = 15.0, origin: tuple[str, bytes] | None = None) -> list[dict]:
    """The `record`s of `model` published at or after `offset` (or the oldest one kept) of a
    single-partition topic (outcomes, drift.events, retrain.requests), in order, read up to its
    high watermark as of now; with `origin`, only messages carrying that header."""
    c = kafka.consumer(settings, f"{topic}.tail.{uuid.uuid4().hex[:8]}", **{"isolation.level": "read_uncommitted"})
    codec = get_codec()
    out: list[dict] = []
    try:
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10.0, cached=False)
        offset = max(offset, low)
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
                if origin is not None and origin not in (m.headers() or ()):
                    continue
                try:
                    o = codec.decode(m.value(), expect=record)
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




class Replay:
    """After a crash: the labels whose outcomes were published since the checkpoint are re-learned
    first, in their published order, and their outcomes are not published again.

    >>> replay = Replay([{"event_id": "e1", "role": "champion"}, {"event_id": "e1", "role": "challenger"},
    ...                  {"event_id": "e2", "role": "champion"}], deadline=0.0)
    >>> [lb.event_id for lb in replay.ready([Label("e2", "1", 2.0, 0.0, b"", None, 0, 2),
    ...                                      Label("e1", "1", 1.0, 0.0, b"", None, 0, 1)])]
    ['e1', 'e2']
    >>> replay.published("e1", "challenger"), replay.published("e1", "challenger")
    (True, False)

    The retrain requests and drift events the loop published since the checkpoint are not
    published again either when the replay takes the same decisions (same ids):

    >>> replay = Replay(requests={"r1"}, alarms={"d1"})
    >>> replay.requested("r1"), replay.requested("r2"), replay.alarmed("d1"), replay.alarmed("d2")
    (True, False, True, False)
    """

    def __init__(self, published: list[dict] = (), deadline: float = 0.0, requests: set[str] = frozenset(),
                 alarms: set[str] = frozenset()) -> None:
        self.order: deque[str] = deque(o["event_id"] for o in published if o["role"] == "champion")
        self.suppress: set[tuple[str, str]] = {(o["event_id"], o["role"]) for o in published}
        self.deadline = deadline  # monotonic time after which the ordered replay is given up
        self.requests = set(requests)
        self.alarms = set(alarms)

    def __len__(self) -> int:
        return len(self.order)

    def ready(self, waiting: list[Label]) -> list[Label]:
        """The waiting labels next in the published order (up to the first one not read yet)."""
        by_id = {lb.event_id: lb for lb in waiting}
        ready = []
        for event_id in self.order:
            if event_id not in by_id:
                break
            ready.append(by_id[event_id])
        return ready

    def learned(self) -> None:
        self.order.popleft()

    def published(self, event_id: str, role: str) -> bool:
        """Was this outcome published before the crash? (Then it is not published again.)"""
        if (event_id, role) in self.suppress:
            self.suppress.discard((event_id, role))
            return True
        return False

    def requested(self, request_id: str) -> bool:
        """Was this retrain request published before the crash? (Then it is not published again.)"""
        return request_id in self.requests

    def alarmed(self, drift_id: str) -> bool:
        """Was this drift event published before the crash? (Then it is not published again.)"""
        return drift_id in self.alarms

    def give_up(self) -> None:
        self.order.clear()
