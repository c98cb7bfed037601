"""The follower: keeps the models this worker serves equal to the learner's, example by example.

One thread per worker process (every uvicorn worker and every replica follows on its own, with a
consumer of its own that never commits). It reads three topics:

- `outcomes` (one partition, the learner's learning order): each champion outcome carries the
  vector the learner learned and the label, at its position; every served replica learns it
  (replica.py), so the served model is the learner's, state for state, a few milliseconds after
  the learner learned it;
- `model.swaps` (a new champion) and `model.updates` (a new artifact of a version): the follower
  looks at the registry and loads what it must (`reconcile`): another champion, a challenger for
  the canary, a version the learner has taken up again after a rollback, or a newer artifact when
  learning the examples in between would take longer than loading it (a worker that fell behind).

A replica loaded from an artifact saved at time T needs the outcomes produced after T: the
follower reads the partition from there (the broker's time index; it seeks back only when it has
read past that point) and the replica skips what it knows.
An outcome produced before its artifact was saved belongs to another stretch of the learner's
history (a learner that started over), and is not for it. When the learner's positions go back
(`rewind`: it re-learned history differently) the replicas stop learning until the learner saves
artifacts after it: a replica never guesses.

Every request reads `holder.current` once; the follower replaces it whole (another version) or lets
it learn in place under its lock (replica.py). The registry stays the truth: a slow reconcile every
`reconcile_s` catches what a lost message missed. Freshness is exported per role:
`driftline_serving_lag_examples`, `driftline_serving_lag_seconds` and, per example learned by the
champion, `driftline_serving_learn_delay_seconds` (from the learner's outcome to this worker).

    follower = ModelFollower(settings, holder, registry, canary)
    follower.sync_now()   # load what the registry names, now (start, admin routes)
    follower.start()      # background thread
    follower.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_END, TIMESTAMP_CREATE_TIME, KafkaException, TopicPartition

from ..shared import kafka, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion
from ..shared.settings import Settings
from ..shared.threads import BackgroundThread
from ..shared.topics import OUTCOME_MODEL_HEADER, OUTCOME_ROLE_HEADER, Topics
from .models import ModelHolder
from .replica import Gap, Replica

log = logging.getLogger(__name__)
SERVICE = "prediction"
ROLES = ("champion", "challenger")
# An outcome's broker timestamp is the learner's clock in whole milliseconds, taken after the
# artifact before it was saved: an outcome older than its artifact by more is from other history.
CLOCK_SLACK_S = 0.002


def replica_group(topics: Topics) -> str:
    """A consumer group of its own for this process (host, pid and a random part)."""
    return topics.group(SERVICE, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def not_ours(headers: list[tuple[str, bytes]] | None, model: bytes) -> bool:
    """An outcome whose headers say it is not the champion's of `model` (one without them, from an
    older learner, is decoded and looked at).

        >>> not_ours([("driftline-model", b"default"), ("driftline-role", b"challenger")], b"default")
        True
        >>> not_ours([("driftline-model", b"default"), ("driftline-role", b"champion")], b"default")
        False
        >>> not_ours([("driftline-model", b"other"), ("driftline-role", b"champion")], b"default"), not_ours(None, b"default")
        (True, False)
    """
    for key, value in headers or ():
        if (key == OUTCOME_ROLE_HEADER and value != b"champion") or (key == OUTCOME_MODEL_HEADER and value != model):
            return True
    return False


class ModelFollower(BackgroundThread):
    reconcile_s = 5.0
    retry_s = 1.0
    batch = 500
    thread_name = "model-follower"

    def __init__(self, settings: Settings, holder: ModelHolder, registry: ModelRegistry, canary) -> None:
        super().__init__()
        self.settings = settings
        self.registry = registry
        self.canary = canary  # canary.py: whether the challenger is served, and its holder
        self.name = holder.model_name
        self.name_bytes = self.name.encode()
        self.holders = {"champion": holder, "challenger": canary.holder}
        self.topics = Topics(settings.namespace)
        self.codec = get_codec()
        self.group = replica_group(self.topics)
        self.assigned = False  # True once the consumer follows the three topics
        self.lock = threading.RLock()  # one writer of the replicas: this thread, or sync_now's caller
        self._counted: dict[str, Any] = {}  # topic -> its MESSAGES_IN child
        self._sync = threading.Event()  # a reconcile is wanted
        # The stream as read: the position after the last champion outcome, and the newest (position, ts).
        self.read_next: int | None = None
        self.newest: tuple[int, float] | None = None
        self.seek_s: float | None = None  # seek `outcomes` to this time (learner clock) after the batch
        self.fetch_from = 0  # the offset `outcomes` was last assigned or sought at
        self.not_before = 0.0  # after a rewind: only artifacts saved later than this are followed
        self.swap_ts: float | None = None  # the oldest swap/update message not reconciled yet
        self.apply_s = 0.0  # seconds per example learned (a moving average)
        self.load_s: dict[int, float] = {}  # version -> seconds its last load took
        self._unread = metrics.CONSUMER_LAG.labels(SERVICE, "outcomes", "0")
        self._lag = {role: (metrics.SERVING_LAG_EXAMPLES.labels(self.name, role),
                            metrics.SERVING_LAG_SECONDS.labels(self.name, role)) for role in ROLES}

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        consumer = kafka.consumer(self.settings, self.group, **{"logger": log})
        try:
            self._assign(consumer)
            last_reconcile = time.monotonic()
            while not self._stop.is_set():
                messages = self._next_batch(consumer)
                with self.lock:
                    for m in messages:
                        if m.error() is None:
                            self._guarded(self.handle, m)
                        else:
                            log.warning("model follower: consumer error %s", m.error())
                    if (self._sync.is_set() or self.canary.changed.is_set()
                            or time.monotonic() - last_reconcile > self.reconcile_s):
                        self._guarded(self.reconcile)
                        last_reconcile = time.monotonic()
                    if self.seek_s is not None:
                        self._guarded(self._seek, consumer)
                    self.export_lag(consumer)
                if messages:
                    time.sleep(0)  # let the requests waiting for the GIL in between batches
        finally:
            self.assigned = False
            consumer.close()

    def _next_batch(self, consumer) -> list:
        """What has come, as soon as something has: `consume` alone waits for a full batch or its
        timeout, a poll returns at the first message (then the rest that is there is taken too)."""
        first = consumer.poll(0.1)
        if first is None:
            return []
        return [first, *consumer.consume(self.batch - 1, timeout=0)]

    def handle(self, m) -> None:
        base = kafka.base_topic(m.topic())
        counted = self._counted.get(base)
        if counted is None:  # one child per topic: labels() on every message cost ~1 µs
            counted = self._counted[base] = metrics.MESSAGES_IN.labels(SERVICE, base)
        counted.inc()
        if base == "outcomes":
            if not_ours(m.headers(), self.name_bytes):
                return  # not decoded: a challenger's, or another model's
            self.outcome(self.codec.decode(m.value(), expect="Outcome"), _created_s(m))
            return
        record = self.codec.decode(m.value(), expect="ModelSwap" if base == "model.swaps" else "ModelUpdate")
        if record["model"] == self.name:  # another champion, or a new artifact: look at the registry
            self.swap_ts = min(self.swap_ts or record["ts"], record["ts"])
            self._sync.set()

    def outcome(self, record: dict[str, Any], ts: float | None) -> None:
        """One outcome: every served replica learns it if it is the next example it needs."""
        if record["model"] != self.name or record["role"] != "champion":
            return  # every role learns the example at each position: the champion's outcome carries it
        position = record["position"]
        if self.read_next is not None and position < self.read_next:
            self.rewind(position, ts)
        self.read_next = position + 1
        if ts is not None and (self.newest is None or position > self.newest[0]):
            self.newest = (position, ts)
        x, y = record["features"], record["y_true"]
        for role, holder in self.holders.items():
            replica = holder.current
            if replica is None:
                continue
            if ts is not None and ts < replica.saved_at - CLOCK_SLACK_S:
                continue  # learned before its artifact was saved: known to it, or from other history
            if not replica.following:
                replica.missed(position, ts)
                continue
            started = time.perf_counter()
            try:
                learned = replica.learns(position, x, y)
            except Gap as gap:
                replica.missed(position, ts)
                self.gap(role, replica, gap)
                continue
            if learned:
                self.apply_s = 0.99 * self.apply_s + 0.01 * (time.perf_counter() - started)
                if ts is not None:
                    replica.stream_ts = ts
                    if role == "champion":
                        metrics.SERVING_LEARN_DELAY.observe(max(0.0, time.time() - ts))

    def gap(self, role: str, replica: Replica, gap: Gap) -> None:
        """An example beyond the next one: seek back once to where the replica's examples start;
        if they are not there, stop learning until a newer artifact comes."""
        if self.seek_s is not None:
            return  # the examples it needs are before the point a pending seek goes back to
        if not replica.sought:
            replica.sought = True
            self.seek_back(replica.stream_ts)
            return
        log.error("model follower: %s v%d needs the example at position %d, the stream has %d next: the "
                  "examples between are missing; serving it as it is until the learner saves a newer artifact",
                  role, replica.version, gap.needed, gap.got)
        replica.freeze()
        self._sync.set()

    def rewind(self, position: int, ts: float | None) -> None:
        """The learner's positions went back: it learned its history again, differently. What the
        replicas hold may not be the learner's any more; they stop learning until it saves newer
        artifacts."""
        log.error("model follower: the learner's positions went back to %d (after %d): following again from "
                  "its next artifacts", position, self.read_next)
        self.not_before = max(self.not_before, ts or time.time())
        for holder in self.holders.values():
            if holder.current is not None and holder.current.following:
                holder.current.freeze()
                metrics.SERVING_RELOADS.labels(self.name, "rewind").inc()
        self._sync.set()

    # -- the registry: which version serves each role, from which artifact ---------------------
    def sync_now(self) -> None:
        """Reconcile at once, in the caller's thread (start, an admin route)."""
        with self.lock:
            self.reconcile()

    def reconcile(self) -> None:
        self._sync.clear()
        self.canary.changed.clear()
        champion = self.registry.champion()
        challenger = self.registry.challenger() if self.canary.share > 0 else None
        self.place("champion", champion)
        self.place("challenger", challenger)
        self.swap_ts = None

    def place(self, role: str, version: int | None) -> None:
        holder = self.holders[role]
        current = holder.current
        if version is None:
            if role == "challenger" and current is not None:
                self.install(role, None, "canary")
            return
        if current is not None and current.version == version:
            if self.worth_reloading(current, self.registry.meta(version)):
                self.load(role, version, "update")
            return
        challenger = self.holders["challenger"].current
        if role == "champion" and challenger is not None and challenger.version == version:
            self.install(role, challenger, "promotion")  # the canary's challenger, already followed
            return
        self.load(role, version, "start" if current is None else "swap" if role == "champion" else "canary")

    def worth_reloading(self, replica: Replica, meta: dict[str, Any]) -> bool:
        """A newer artifact of the version served: loaded when the replica does not follow the
        learner (a newer state of it, or the learner has taken the version up again, or a rewind
        stopped it) or when it is further behind than one load costs."""
        position = meta.get("next_position")
        if int(meta.get("revision", 0)) <= replica.revision:
            return False
        if not replica.following:
            return position is None or float(meta.get("updated_at") or 0.0) >= self.not_before
        if position is None or not self.settings.prediction.catch_up_from_snapshots:
            return False  # (None: the learner stops learning it, another version takes its role next)
        behind = int(position) - replica.position
        return behind > 0 and behind * self.apply_s > self.load_s.get(replica.version, 0.0)

    def load(self, role: str, version: int, reason: str) -> None:
        holder = self.holders[role]
        started = time.perf_counter()
        try:
            model, meta = self.registry.load(version)
        except TamperedArtifact as exc:
            holder.refused[version] = str(exc)
            log.error("REFUSED model %s version %s (%s); still serving %s", self.name, version, exc,
                      holder.current and holder.current.version)
            return
        except UnknownVersion:
            log.error("model %s version %s has no artifact; still serving %s", self.name, version,
                      holder.current and holder.current.version)
            return
        self.load_s[version] = time.perf_counter() - started
        replica = Replica.from_artifact(model, meta)
        if replica.saved_at < self.not_before:
            replica.freeze()  # saved before a rewind: not the learner's history any more
        holder.refused.pop(version, None)
        self.install(role, replica, reason)
        if replica.following and (self.read_next is None or replica.position < self.read_next):
            self.seek_back(replica.saved_at)  # the stream has passed its first examples, or is not read yet

    def install(self, role: str, replica: Replica | None, reason: str) -> None:
        if role == "champion":
            self.holders[role].swap(replica)
        else:
            self.canary.install(replica)
        if replica is None:
            return
        metrics.SERVING_RELOADS.labels(self.name, reason).inc()
        if self.swap_ts is not None:
            metrics.SWAP_SECONDS.observe(max(0.0, time.time() - self.swap_ts))
        log.info("serving model %s version %s revision %s as %s (%s), %s", self.name, replica.version,
                 replica.revision, role, reason, f"learning from position {replica.position}"
                 if replica.following else "as it was saved")

    # -- the outcomes partition ---------------------------------------------------------------
    def seek_back(self, ts: float) -> None:
        self.seek_s = ts if self.seek_s is None else min(self.seek_s, ts)

    def _seek(self, consumer) -> None:
        """Back to the first outcome the replicas need, unless the consumer has not got there yet
        (a seek to where it stands is not needed, and one made right after librdkafka started
        fetching the partition could leave it waiting without fetching)."""
        target = self._offset_at(consumer, self.seek_s)
        here = consumer.position([TopicPartition(self.topics.outcomes, 0)])[0].offset
        if target < (here if here >= 0 else self.fetch_from):
            consumer.seek(TopicPartition(self.topics.outcomes, 0, target))
            self.fetch_from = target
        self.seek_s, self.read_next = None, None  # lower positions may come next: a replica needs them

    def _offset_at(self, consumer, ts: float) -> int:
        """The first outcome produced at `ts` or later (learner clock), or the partition's end as it
        is now: an explicit offset, never "the end" resolved later, past what comes meanwhile."""
        when = TopicPartition(self.topics.outcomes, 0, max(0, int((ts - CLOCK_SLACK_S) * 1000)))
        offset = consumer.offsets_for_times([when], timeout=5.0)[0].offset
        if offset < 0:
            offset = consumer.get_watermark_offsets(TopicPartition(self.topics.outcomes, 0), timeout=5.0)[1]
        return offset

    def _assign(self, consumer) -> None:
        """model.swaps and model.updates from their end; outcomes from where the replicas need them."""
        while not self._stop.is_set():
            try:
                parts = []
                for name in (self.topics.model_swaps, self.topics.model_updates):
                    for p in self._partitions(consumer, name):
                        _low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5.0)
                        parts.append(TopicPartition(name, p, high if high >= 0 else OFFSET_END))
                with self.lock:
                    self.reconcile()  # meanwhile a message may come: it is read, and harmless
                    self.read_next = None
                    following = [h.current.stream_ts for h in self.holders.values()
                                 if h.current is not None and h.current.following]
                    start = min(following) if following else time.time()
                    self.seek_s = None
                self._partitions(consumer, self.topics.outcomes)
                self.fetch_from = self._offset_at(consumer, start)
                parts.append(TopicPartition(self.topics.outcomes, 0, self.fetch_from))
                consumer.assign(parts)
                self.assigned = True
                log.info("model follower %s follows model.swaps, model.updates and outcomes", self.group)
                return
            except (KafkaException, RuntimeError) as exc:
                log.warning("model follower: Kafka does not answer yet (%s); retrying", exc)
                self._guarded(self.sync_now)  # meanwhile the registry alone says what serves
                self._stop.wait(self.retry_s)

    @staticmethod
    def _partitions(consumer, name: str) -> list[int]:
        meta = consumer.list_topics(name, timeout=5.0).topics[name]
        if meta.error is not None:
            raise KafkaException(meta.error)
        return sorted(meta.partitions)

    # -- freshness ------------------------------------------------------------------------------
    def export_lag(self, consumer) -> None:
        """Per role: the examples the learner has learned that the served model has not (of those
        read), and for how long; while the partition holds more than was read, the time since the
        newest one read (those unread are newer)."""
        now = time.time()
        unread = False
        try:
            _low, high = consumer.get_watermark_offsets(TopicPartition(self.topics.outcomes, 0), cached=True)
            position = consumer.position([TopicPartition(self.topics.outcomes, 0)])[0].offset
            if high >= 0 and position >= 0:
                unread = high > position
                self._unread.set(high - position)
        except KafkaException:
            pass
        for role, (examples, seconds) in self._lag.items():
            replica = self.holders[role].current
            if replica is None:
                examples.set(0)
                seconds.set(0)
                continue
            lag_examples, lag_s = replica.lag(self.newest, now)
            if unread and self.newest is not None:
                lag_s = max(lag_s, now - self.newest[1])
            examples.set(lag_examples)
            seconds.set(lag_s)

    def freshness(self) -> dict[str, dict[str, Any]]:
        """Each served role's replica and its lag, as /v1/models shows it."""
        now = time.time()
        out = {}
        for role, holder in self.holders.items():
            replica = holder.current
            if replica is not None:
                lag_examples, lag_s = replica.lag(self.newest, now)
                out[role] = {**replica.describe(), "lag_examples": lag_examples, "lag_seconds": round(lag_s, 4)}
        return out

    # -- helpers around the loop --------------------------------------------------------------
    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except DecodeError as exc:
            log.error("model follower: unreadable message (%s); skipped", exc)
        except Exception:  # Redis hiccup, bad artifact...: keep serving what we have, keep following
            log.exception("model follower: could not apply a model change; still serving the current model")

    # -- thread control (shared/threads.py) ---------------------------------------------------
    def _guarded_run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run()
            except Exception:
                log.exception("model follower died; restarting it")
                self._stop.wait(self.retry_s)


def _created_s(m) -> float | None:
    """The message's producer timestamp in seconds (None when the broker stamped it instead)."""
    kind, ms = m.timestamp()
    return ms / 1000 if kind == TIMESTAMP_CREATE_TIME and ms >= 0 else None
