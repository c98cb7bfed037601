"""The replay's collector: a thread that reads the pipeline's answers to one replay.

    collector = Collector(settings, f"{run_id}-", f"{run_id}/"); collector.start()
    ... publish ...
    collector.stop(); collector.decode_outcomes(); collector.data.outcomes

It reads `outcomes`, `events.dlq`, `labels.dlq`, `events.valid`, `drift.events` and `model.swaps`
from the offsets they had when the replay began, keeping only this replay's records (its event ids
share the run prefix). It never reads or writes a service's state.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from ..shared import kafka
from ..shared.codec import DecodeError, get_codec
from ..shared.schema_registry import prepare_output
from ..shared.settings import Settings
from ..shared.topics import Topics, outcome_role


@dataclass
class Collected:
    """What the pipeline answered, as the collector thread saw it."""

    outcomes: list[dict] = field(default_factory=list)
    challenger_outcomes: int = 0
    labels_dlq: list[dict] = field(default_factory=list)
    events_dlq: list[dict] = field(default_factory=list)
    events_valid: set[str] = field(default_factory=set)  # ids seen on events.valid (a copy counts once)
    events_valid_raw: list[bytes] = field(default_factory=list)  # read, decoded after the run (count_valid)
    outcomes_raw: list[tuple[bytes, int]] = field(default_factory=list)  # this run's champion (value, broker ms), not decoded yet
    events_valid_copies: int = 0  # messages beyond the first per id: at-least-once after an ingestion crash
    drift: list[dict] = field(default_factory=list)
    swaps: list[dict] = field(default_factory=list)
    accounted: set[str] = field(default_factory=set)  # event ids whose label is learned or dead
    learned_at_s: list[float] = field(default_factory=list)  # broker time of each champion outcome
    last_progress: float = field(default_factory=time.monotonic)

    @property
    def last_learned_s(self) -> float | None:
        return self.learned_at_s[-1] if self.learned_at_s else None


class Collector(threading.Thread):
    """Reads the pipeline's output topics from where they stood before the replay, keeping only
    this replay's records (its event ids share the run prefix)."""

    def __init__(self, settings: Settings, run_prefix: str, entity_prefix: str = "") -> None:
        super().__init__(name="replay-collector", daemon=True)
        self.settings = settings
        self.topics = Topics(settings.namespace)
        self.prefix = run_prefix
        self.entity_prefix = entity_prefix.encode()  # outcome keys (entity ids) of this run start with it
        prepare_output(settings)  # outcomes in the Confluent wire format, when the settings say so
        self.codec = get_codec()
        self.data = Collected()
        self.lock = threading.Lock()
        self._halt = threading.Event()
        self.error: BaseException | None = None
        self.consumer: Consumer = kafka.consumer(settings, f"driftline.replay.{uuid.uuid4().hex[:8]}")
        t = self.topics
        self.handlers = {
            t.outcomes: self._outcome, t.labels_dlq: self._label_dlq, t.events_dlq: self._event_dlq,
            t.events_valid: self._event_valid, t.drift_events: self._drift, t.model_swaps: self._swap,
        }
        # Pin the start now (before anything is published): the high watermark of every partition.
        parts = []
        for topic in self.handlers:
            for tp in kafka.partitions_of(settings, topic):
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
                parts.append(TopicPartition(topic, tp.partition, high if high >= 0 else OFFSET_END))
        self.consumer.assign(parts)
        self.read_to: dict[tuple[str, int], int] = {(tp.topic, tp.partition): tp.offset for tp in parts}

    def read_to_end(self, topics: list[str], timeout_s: float = 10.0) -> bool:
        """Wait until the topics are read up to the ends they have now (what the pipeline produced
        before its last outcome: a drift event, a swap); False if that took longer than timeout_s.
        The ends are asked with a consumer of its own: this thread's consumer is busy in run()."""
        asker = kafka.consumer(self.settings, f"driftline.replay.ends.{uuid.uuid4().hex[:8]}")
        try:
            ends = {(tp.topic, tp.partition): asker.get_watermark_offsets(tp, timeout=5, cached=False)[1]
                    for topic in topics for tp in kafka.partitions_of(self.settings, topic)}
        except KafkaException:
            return False
        finally:
            asker.close()
        deadline = time.monotonic() + timeout_s
        while any(self.read_to.get(where, 0) < end for where, end in ends.items()):
            if time.monotonic() > deadline or self.error is not None or not self.is_alive():
                return False
            time.sleep(0.05)
        return True

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for msg in self.consumer.consume(1000, 0.2):
                    if msg.error():
                        continue
                    self.handlers[msg.topic()](msg)
                    self.read_to[(msg.topic(), msg.partition())] = msg.offset() + 1
        except BaseException as exc:  # surfaced by the waiting thread
            self.error = exc
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def snapshot(self) -> Collected:
        with self.lock:
            return self.data

    # -- one small handler per topic ---------------------------------------------------------
    def _mine(self, event_id: str | None) -> bool:
        return bool(event_id) and event_id.startswith(self.prefix)

    def _decode(self, blob: bytes, expect: str) -> dict | None:
        try:
            return self.codec.decode(blob, expect=expect)
        except DecodeError:
            return None

    def progress(self) -> tuple[int, int]:
        """(labels accounted for, champion outcomes read and not decoded yet)."""
        with self.lock:
            return len(self.data.accounted), len(self.data.outcomes_raw)

    def _outcome(self, msg) -> None:
        # Kept as bytes, decoded when the count may be complete (decode_outcomes): decoding each
        # outcome as it came (~37 µs) took CPU from the pipeline the replay measures. A challenger's
        # is only counted (its header says whose it is): the report is about what was served.
        key = msg.key()
        if not key or not key.startswith(self.entity_prefix):
            return
        role = outcome_role(msg.headers())
        with self.lock:
            self.data.last_progress = time.monotonic()
            if role is not None and role != "champion":
                self.data.challenger_outcomes += 1
                return
            self.data.outcomes_raw.append((msg.value(), msg.timestamp()[1]))

    def decode_outcomes(self) -> None:
        """Decode the outcomes read so far: champion ones are learned labels, in arrival order (one
        without a role header, from an older learner, is told by its record)."""
        with self.lock:
            raw, self.data.outcomes_raw = self.data.outcomes_raw, []
        for value, broker_ms in raw:
            o = self._decode(value, "Outcome")
            if not o or not self._mine(o["event_id"]):
                continue
            with self.lock:
                if o["role"] != "champion":
                    self.data.challenger_outcomes += 1
                    continue
                self.data.outcomes.append(o)
                self.data.accounted.add(o["event_id"])
                self.data.learned_at_s.append(broker_ms / 1000.0)

    def _dead_id(self, msg, record: str) -> tuple[dict | None, str | None]:
        dl = self._decode(msg.value(), "DeadLetter")
        if dl is None:
            return None, None
        original = self._decode(dl["payload"], record)
        event_id = original["event_id"] if original else None
        if event_id is None and record == "Label" and dl.get("key"):
            event_id = bytes(dl["key"]).decode(errors="replace")
        return dl, event_id

    def _label_dlq(self, msg) -> None:
        self._dead_lettered(msg, "Label", self.data.labels_dlq)

    def _event_dlq(self, msg) -> None:
        # An event's label can never be learned: it is accounted for now rather than after the
        # learner's grace period dead-letters the label too.
        self._dead_lettered(msg, "Event", self.data.events_dlq)

    def _dead_lettered(self, msg, record: str, into: list[dict]) -> None:
        """A DLQ record of one of this run's events or labels: kept, and its event accounted for."""
        dl, event_id = self._dead_id(msg, record)
        if dl is None or not self._mine(event_id):
            return
        with self.lock:
            into.append({"event_id": event_id, "reason": dl["reason"], "detail": dl["detail"],
                         "service": dl["service"]})
            self.data.accounted.add(event_id)
            self.data.last_progress = time.monotonic()

    def _event_valid(self, msg) -> None:
        # Kept as bytes and decoded once the run is over: nothing waits on this count, and decoding
        # every valid event while the pipeline runs took CPU from it (a bench on 2 cores).
        with self.lock:
            self.data.events_valid_raw.append(msg.value())

    def count_valid(self) -> None:
        """The distinct valid events of this replay, and the copies beyond the first (after stop())."""
        data = self.data
        for blob in data.events_valid_raw:
            event = self._decode(blob, "Event")
            if not event or not self._mine(event["event_id"]):
                continue
            event_id = event["event_id"]
            if event_id in data.events_valid:
                data.events_valid_copies += 1
            else:
                data.events_valid.add(event_id)
        data.events_valid_raw = []

    def _drift(self, msg) -> None:
        d = self._decode(msg.value(), "DriftEvent")
        if d:
            with self.lock:
                self.data.drift.append(d)

    def _swap(self, msg) -> None:
        s = self._decode(msg.value(), "ModelSwap")
        if s:
            with self.lock:
                self.data.swaps.append(s)
