"""Canary / A-B routing: a share of /v1/predict answered by the challenger, sticky by entity id,
judged on its *served* accuracy once labels arrive, rolled back automatically when it is worse.

    >>> arm_of("meter-7", 0.0), arm_of("meter-7", 1.0)
    ('champion', 'challenger')
    >>> score = ArmScores(window=100)
    >>> for hit in [True] * 90 + [False] * 10: score.record("champion", hit)
    >>> for hit in [True] * 70 + [False] * 30: score.record("challenger", hit)
    >>> score.worse_by(min_labels=50, margin=0.05)     # error 0.30 vs 0.10
    0.2

The share lives in Redis (`Keys.canary`), so every replica and worker routes alike and an admin
change or an automatic rollback reaches them all within a refresh. Each replica joins the labels
of `labels.valid` with the predictions *it* served (a bounded map by event_id), so an arm's
accuracy is that of the answers it really gave. Routing never touches Redis on the request path.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque

from confluent_kafka import OFFSET_END, TopicPartition

from ..shared import kafka, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.keys import Keys
from ..shared.settings import Settings
from ..shared.topics import Topics
from .models import ModelHolder

log = logging.getLogger(__name__)
ARMS = ("champion", "challenger")


def arm_of(entity_id: str, share: float) -> str:
    """The arm of an entity: a stable hash of its id against the share (the same entity always
    lands on the same side while the share stays, and raising the share only moves entities over)."""
    bucket = int.from_bytes(hashlib.blake2b(entity_id.encode(), digest_size=8).digest(), "big") / 2**64
    return "challenger" if bucket < share else "champion"


class ArmScores:
    """Served hits per arm over the last `window` labels."""

    def __init__(self, window: int = 1000) -> None:
        self.hits = {arm: deque(maxlen=window) for arm in ARMS}

    def record(self, arm: str, hit: bool) -> None:
        self.hits[arm].append(hit)

    def accuracy(self, arm: str) -> float | None:
        h = self.hits[arm]
        return sum(h) / len(h) if h else None

    def worse_by(self, min_labels: int, margin: float) -> float | None:
        """How much the challenger's error rate exceeds the champion's, when it does by more than
        `margin` with at least `min_labels` served labels on each side; else None."""
        if min(len(self.hits[a]) for a in ARMS) < min_labels:
            return None
        gap = (1 - self.accuracy("challenger")) - (1 - self.accuracy("champion"))
        return round(gap, 6) if gap > margin else None

    def reset(self) -> None:
        for h in self.hits.values():
            h.clear()


class Canary:
    """The routing state of one prediction replica: the share, the challenger model, the scores."""

    def __init__(self, settings: Settings, redis_client, registry, model_name: str) -> None:
        self.settings = settings
        self.cfg = settings.prediction
        self.r = redis_client
        self.registry = registry
        self.key = Keys(settings.namespace).canary(model_name)
        self.model_name = model_name
        self.share = self.cfg.canary_share
        self.holder = ModelHolder(model_name, gauge=False)  # the challenger, installed by the follower
        self.changed = threading.Event()  # the challenger to serve may have changed: the follower looks
        self.scores = ArmScores(self.cfg.canary_window)
        self.served: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # event_id -> (arm, prediction)
        self.max_served = 200_000
        self.lock = threading.Lock()
        self.rolled_back: str | None = None
        self._stop = threading.Event()
        # exported from zero (the dashboard has series before the first canary), and kept: a
        # request counts itself without looking its series up
        self._requests = {arm: metrics.CANARY_REQUESTS.labels(model_name, arm) for arm in ARMS}
        self._seconds = {arm: metrics.CANARY_SECONDS.labels(model_name, arm) for arm in ARMS}
        for arm in ARMS:
            metrics.CANARY_ACCURACY.labels(model_name, arm).set(0)
        metrics.CANARY_ROLLBACKS.labels(model_name)
        metrics.CANARY_SHARE.labels(model_name).set(self.share)

    # -- the request path: no I/O ------------------------------------------------------------
    def pick(self, entity_id: str, champion):
        """(arm, replica) for this entity: the challenger when its share says so and one is loaded."""
        challenger = self.holder.current
        if self.share > 0 and challenger is not None and arm_of(entity_id, self.share) == "challenger":
            return "challenger", challenger
        return "champion", champion

    def answered(self, arm: str, event_id: str, prediction: str | None, seconds: float) -> None:
        self._requests[arm].inc()
        self._seconds[arm].observe(seconds)
        if self.share <= 0:
            return  # no canary: nothing to judge, so labels need not be joined
        with self.lock:
            self.served[event_id] = (arm, prediction)
            if len(self.served) > self.max_served:
                self.served.popitem(last=False)

    # -- state shared by the replicas (Redis), refreshed off the request path -----------------
    def refresh(self) -> None:
        state = {k.decode(): v.decode() for k, v in self.r.hgetall(self.key).items()}
        if "share" in state:
            self.share = float(state["share"])
        self.rolled_back = state.get("rolled_back")
        metrics.CANARY_SHARE.labels(self.model_name).set(self.share)
        target = self.registry.challenger() if self.share > 0 else None
        if target != (self.holder.current.version if self.holder.current else None):
            self.changed.set()  # the follower loads it (or stops serving it: dropped, promoted, share 0)

    def install(self, replica) -> None:
        """The challenger replica to route to (None: none); the follower's call."""
        before = self.holder.current
        self.holder.swap(replica)
        if replica is not None and before is not None and before.version != replica.version:
            self.scores.reset()  # another challenger: its record starts afresh

    def set_share(self, share: float, why: str | None = None, keep_record: bool = False) -> None:
        """A new share for all replicas; the served record starts afresh, except on a rollback
        (`keep_record`): there it is the evidence an operator reads in /v1/models."""
        mapping = {"share": share, "version": self.registry.challenger() or 0, "rolled_back": why or ""}
        self.r.hset(self.key, mapping=mapping)
        if not keep_record:
            self.scores.reset()
        self.refresh()

    def state(self) -> dict:
        served = self.holder.current
        return {"share": self.share, "challenger": served.version if served else None,
                "rolled_back": self.rolled_back or None,
                "served_accuracy": {arm: self.scores.accuracy(arm) for arm in ARMS},
                "served_labels": {arm: len(self.scores.hits[arm]) for arm in ARMS}}

    # -- labels: served accuracy, and the automatic rollback -----------------------------------
    def label(self, event_id: str, label: str) -> None:
        with self.lock:
            served = self.served.pop(event_id, None)
        if served is None:
            return
        arm, prediction = served
        self.scores.record(arm, prediction == label)
        metrics.CANARY_ACCURACY.labels(self.model_name, arm).set(self.scores.accuracy(arm))
        gap = self.scores.worse_by(self.cfg.canary_min_labels, self.cfg.canary_max_error_increase)
        if gap is not None and self.share > 0:
            version = self.holder.current.version if self.holder.current else None
            why = (f"served error rate {gap:.3f} above the champion's (margin "
                   f"{self.cfg.canary_max_error_increase:g}) over the last {self.cfg.canary_window} labels")
            log.warning("canary of %s v%s rolled back: %s", self.model_name, version, why)
            metrics.CANARY_ROLLBACKS.labels(self.model_name).inc()
            if version is not None:
                self.registry.annotate(version, canary_rolled_back=why, canary_rolled_back_at=time.time())
            self.set_share(0.0, why, keep_record=True)

    def follow_labels(self) -> None:
        """Thread: labels.valid from its end, joined with what this replica served."""
        codec, topic = get_codec(), Topics(self.settings.namespace).labels_valid
        while not self._stop.is_set():
            # Served accuracy is a dashboard's figure, not the hot path's: large fetches, few of them
            # (the broker's CPU per fetch request is shared with the hot path).
            c = kafka.consumer(self.settings, f"driftline.canary.{id(self)}",
                               **{"logger": log, "fetch.min.bytes": 64 * 1024, "fetch.wait.max.ms": 500})
            try:
                c.assign([TopicPartition(topic, tp.partition, OFFSET_END)
                          for tp in kafka.partitions_of(self.settings, topic)])
                while not self._stop.is_set():
                    for m in c.consume(500, timeout=0.5):
                        if m.error() is None and self.served:
                            try:
                                lb = codec.decode(m.value(), expect="Label")
                            except DecodeError:
                                continue
                            self.label(lb["event_id"], lb["label"])
            except Exception:  # Kafka away: served accuracy pauses, serving goes on
                log.warning("canary: cannot follow labels.valid; retrying", exc_info=True)
                self._stop.wait(2.0)
            finally:
                c.close()

    def start(self) -> None:
        threading.Thread(target=self.follow_labels, name="canary-labels", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
