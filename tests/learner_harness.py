"""Drives a learner the way the features service does: snapshots in Redis, then FeatureVectors on
`features` and Labels on `labels.valid`; reads what the learner publishes."""

from __future__ import annotations

import random
import time
import uuid

import httpx
from confluent_kafka import TopicPartition

from driftline.features.definitions import load_feature_set
from driftline.features.store import FeatureStore
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.keys import Keys
from driftline.shared.topics import Topics

T0 = 1_700_000_000.0


def make_rows(n: int, seed: int = 7, start: int = 0, flip: bool = False) -> list[tuple[str, dict, str]]:
    """(event_id, fields, label): a linearly separable concept (inverted when `flip`)."""
    rng = random.Random(seed * 1_000_003 + start)
    rows = []
    for i in range(start, start + n):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        y = (a + 0.5 * b > 0) != flip
        rows.append((f"e{i}", {"a": a, "b": b}, "1" if y else "0"))
    return rows


class Driver:
    def __init__(self, settings, redis_client) -> None:
        self.settings = settings
        self.topics = Topics(settings.namespace)
        self.keys = Keys(settings.namespace)
        self.codec = get_codec()
        self.producer = kafka.producer(settings, log_level=2)  # quiet once the session's broker is gone
        self.store = FeatureStore(redis_client, self.keys, load_feature_set("raw"),
                                  settings.features.snapshot_ttl_s)

    def send(self, rows, entities: int = 3, labels: bool = True, snapshot: bool = True, publish: bool = True) -> None:
        """Events i (snapshot + features) each followed by its label (label delay 0)."""
        vectors = []
        for event_id, fields, _ in rows:
            i = int(event_id[1:])
            vectors.append({"event_id": event_id, "entity_id": f"ent{i % entities}", "ts": T0 + i,
                            "features": fields, "feature_set": "raw@test", "published_ms": int(time.time() * 1000)})
        if snapshot:
            self.store.save_snapshots(vectors)
        for fv, (event_id, _, label) in zip(vectors, rows):
            if not publish:
                continue
            kafka.produce(self.producer, self.topics.features, self.codec.encode("FeatureVector", fv),
                          fv["entity_id"])
            if labels:
                self.label(event_id, label, fv["ts"] + 0.001)
        self.producer.flush(10)

    def label(self, event_id: str, label: str, ts: float) -> None:
        kafka.produce(self.producer, self.topics.labels_valid,
                      self.codec.encode("Label", {"event_id": event_id, "label": label, "ts": ts}), event_id)

    def retrain(self, reason: str = "concept_drift", drift_id: str | None = "d-1", model_version: int | None = None,
                since_position: int | None = None) -> str:
        request_id = uuid.uuid4().hex
        req = {"request_id": request_id, "model": self.settings.learner.model_name, "reason": reason,
               "drift_id": drift_id, "model_version": model_version, "position": 0, "since_position": since_position,
               "ts": time.time()}
        kafka.produce(self.producer, self.topics.retrain_requests, self.codec.encode("RetrainRequest", req), "m")
        self.producer.flush(10)
        return request_id


def read_all(settings, topic: str, record: str, until=None, timeout: float = 60.0, headers: bool = False) -> list[dict]:
    """Every record on `topic` (all partitions, from the beginning), waiting until `until(records)`
    is true (or, without `until`, until nothing new comes for a second); `headers`: each record
    also has its message's headers as a dict under "_headers"."""
    c = kafka.consumer(settings, f"probe-{uuid.uuid4().hex[:8]}", **{"isolation.level": "read_uncommitted"})
    c.assign([TopicPartition(topic, tp.partition, -2) for tp in kafka.partitions_of(settings, topic)])
    codec = get_codec()
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = [m for m in c.consume(1000, timeout=0.2) if m.error() is None]
            out += [codec.decode(m.value(), expect=record) | ({"_headers": dict(m.headers() or ())} if headers else {})
                    for m in batch]
            if batch:
                quiet_since = time.monotonic()
            if until is not None and until(out):
                return out
            if until is None and time.monotonic() - quiet_since > (1.5 if out else 10.0):
                return out
        if until is not None:
            raise TimeoutError(f"{topic}: condition not met in {timeout}s with {len(out)} records")
        return out
    finally:
        c.close()


def champion_outcomes(outcomes: list[dict]) -> list[dict]:
    return [o for o in outcomes if o["role"] == "champion"]


def wait_for(fn, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not met in {timeout}s")


def status(service) -> dict:
    return httpx.get(service.url + "/v1/models", timeout=5).json()
