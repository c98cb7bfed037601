"""The ingestion service: the one way into the pipeline, through two doors.

- Kafka door: consumes `events` and `labels` (Avro, from producers): single-object encoded or, with
  a schema registry (`schema_registry_url`), in the Confluent wire format too.
- HTTP door: `POST /v1/events` and `POST /v1/labels` (JSON; see `api.py`).

Both doors apply the same rules (`validate.py`) and the same first-seen test (`dedup.py`), and
publish to the same topics: valid events to `events.valid` (key entity_id, `published_ms` set from
the Kafka timestamp or the HTTP arrival), valid labels to `labels.valid` (key event_id), anything
else to `events.dlq` / `labels.dlq` as a DeadLetter with the reason and the original bytes.

    driftline serve ingestion        # port settings.ports.ingestion (8001)

It must never drop an input silently nor crash on one: every input ends in exactly one of valid /
dead letter / duplicate, and `driftline_ingested_total{door,topic,outcome}` adds up to what came in.
Inputs are published in the order they were consumed, so per-partition order is kept downstream.
`events.valid` and `labels.valid` carry the current schema version in single-object encoding
whatever the input's framing or version. A message whose writer schema the registry cannot give
right now is neither published nor dead-lettered: its partition is sought back to it and it is
read again after a backoff (`wait_for_registry`), and nothing past it is committed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, Message, Producer, TopicPartition
from fastapi import FastAPI

from ..shared import deps, kafka, metrics, redis_clients
from ..shared.avro_codegen import write_long
from ..shared.codec import get_codec
from ..shared.deadletter import dead_letter, fit_payload
from ..shared.doors import DoorGuard
from ..shared.keys import Keys
from ..shared.app import service_app
from ..shared.loop import StreamWorker
from ..shared.process import run_app
from ..shared.schema_registry import RegistryUnavailable, registry_for
from ..shared.settings import Settings
from ..shared.topics import Topics
from . import SERVICE, validate
from .api import HttpDoor, router
from .dedup import Claim, Dedup
from .validate import Rejection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stream:
    """One kind of input and where it goes: events or labels."""

    name: str  # docs/DESIGN.md base name of the source topic, also the metric label
    record: str  # Avro record name
    source: str  # broker topic names
    valid: str
    dlq: str
    seen: Callable[[str], str]  # Redis key of the first-seen claim
    check_avro: Callable[..., Any]
    check_json: Callable[..., Any]


@dataclass(slots=True)
class Decision:
    """What becomes of one input: `claim` is set for a valid one (value = the record to publish),
    None for a rejected one (value = its DeadLetter)."""

    stream: Stream
    value: bytes
    key: str | bytes | None
    claim: Claim | None
    reason: str | None = None
    detail: str = ""
    ts: float | None = None  # a valid input's event time (the Kafka door commits it as its watermark)


class Ingestor:
    """Decides on inputs from either door and publishes them; the logic both doors share."""

    def __init__(self, settings: Settings, producer: Producer, client: redis.Redis) -> None:
        self.limits = settings.ingestion
        self.producer = producer
        self.codec = get_codec()
        self.registry = registry_for(settings)  # None: single-object input only
        topics, keys = Topics(settings.namespace), Keys(settings.namespace)
        self.dedup = Dedup(client, keys, self.limits.dedup_ttl_s, SERVICE)
        self.events = Stream("events", "Event", topics.events, topics.events_valid, topics.events_dlq,
                             keys.seen_event, validate.check_event_avro, validate.check_event_json)
        self.labels = Stream("labels", "Label", topics.labels, topics.labels_valid, topics.labels_dlq,
                             keys.seen_label, validate.check_label_avro, validate.check_label_json)
        self.by_topic = {s.source: s for s in (self.events, self.labels)}
        self.by_name = {s.name: s for s in (self.events, self.labels)}

    @property
    def reader(self) -> validate.Reader:
        """What reads the Avro door's messages: the registry (both framings) or the codec."""
        return self.registry or self.codec

    # -- deciding ---------------------------------------------------------------------------
    def decide_message(self, m: Message, now: float) -> Decision:
        """One Kafka message -> a Decision. Valid labels pass on their original bytes; valid
        events get `published_ms` from the message's timestamp (the producer's clock). Raises
        RegistryUnavailable when the message's writer schema cannot be had now (it must wait)."""
        stream = self.by_topic[m.topic()]
        blob = m.value()
        checked = stream.check_avro(blob, self.limits, now, self.reader)
        if isinstance(checked, Rejection):
            return self.dead(stream, checked, blob or b"", m.key(), m.topic(), m.partition(), m.offset(), now)
        marker = f"{m.partition()}:{m.offset()}"  # the same message is the same claimant after a crash
        current = self.as_current(blob)  # None: another schema version's record, encoded again as the current one
        if stream is self.labels:
            value = current if current is not None else self.codec.encode("Label", checked)
            return Decision(stream, value, checked["event_id"], Claim(stream.seen(checked["event_id"]), marker),
                            ts=checked["ts"])
        kind, ts_ms = m.timestamp()
        if kind == TIMESTAMP_NOT_AVAILABLE or ts_ms <= 0:
            ts_ms = checked["published_ms"] or int(now * 1000)
        if current is not None:
            value = stamp_published_ms(current, checked["published_ms"], ts_ms)
        else:
            value = self.codec.encode("Event", {**checked, "published_ms": ts_ms})
        return Decision(stream, value, checked["entity_id"], Claim(stream.seen(checked["event_id"]), marker),
                        ts=checked["ts"])

    def as_current(self, blob: bytes) -> bytes | None:
        """A decoded message as single-object bytes of the current version without encoding it
        again (a header swap at most), or None when it was written with another version."""
        if self.registry is None:
            return blob if self.codec.is_current(blob) else None
        return self.registry.as_current(blob)

    def decide_item(self, stream: Stream, item: Any, marker: str, now: float) -> Decision:
        """One JSON item from the HTTP door -> a Decision (its DeadLetter payload is the item's JSON)."""
        checked = stream.check_json(item, self.limits, now)
        if not isinstance(checked, Rejection):
            if stream is self.events:
                checked["published_ms"] = int(now * 1000)
            blob = validate.to_avro(stream.record, checked, self.limits)
            if not isinstance(blob, Rejection):
                key = checked["entity_id"] if stream is self.events else checked["event_id"]
                return Decision(stream, blob, key, Claim(stream.seen(checked["event_id"]), marker))
            checked = blob
        return self.dead(stream, checked, json_bytes(item), None, f"http:/v1/{stream.name}", None, None, now)

    def dead(self, stream: Stream, why: Rejection, payload: bytes, key: bytes | str | None, source: str,
             partition: int | None, offset: int | None, now: float) -> Decision:
        if isinstance(key, str):
            key = key.encode("utf-8", "replace")
        payload, detail = fit_payload(payload, why.detail, self.limits.max_dead_letter_bytes)
        letter = dead_letter(source, why.reason, detail, SERVICE, key, payload, partition, offset, now)
        return Decision(stream, letter, key, None, why.reason, detail)

    # -- publishing -------------------------------------------------------------------------
    def publish(self, decisions: list[Decision], door: str,
                on_delivery: Callable[[int, KafkaError | None], None] | None = None) -> list[str]:
        """Claim the valid ones' ids (one Redis round trip), produce valid ones and dead letters in
        input order, count. Returns each input's outcome: valid | dead_letter | duplicate.
        The caller flushes the producer (and learns of failed deliveries through `on_delivery`)."""
        owned = iter(self.dedup.claim([d.claim for d in decisions if d.claim is not None]))
        outcomes: list[str] = []
        counts: Counter[tuple[Stream, str, str | None]] = Counter()
        for i, d in enumerate(decisions):
            if d.claim is None:
                outcome, topic = "dead_letter", d.stream.dlq
            elif next(owned):
                outcome, topic = "valid", d.stream.valid
            else:
                outcome, topic = "duplicate", None
            outcomes.append(outcome)
            counts[(d.stream, outcome, d.reason)] += 1
            if topic is not None:
                callback = None if on_delivery is None else (lambda err, _msg, i=i: on_delivery(i, err))
                kafka.produce(self.producer, topic, d.value, d.key, on_delivery=callback)
        self.count(counts, door)
        return outcomes

    @staticmethod
    def count(counts: Counter, door: str) -> None:
        for (stream, outcome, reason), n in counts.items():
            metrics.INGESTED.labels(door, stream.name, outcome).inc(n)
            if outcome == "valid":
                metrics.MESSAGES_OUT.labels(SERVICE, kafka.base_topic(stream.valid)).inc(n)
            elif outcome == "dead_letter":
                metrics.MESSAGES_OUT.labels(SERVICE, kafka.base_topic(stream.dlq)).inc(n)
                metrics.DEAD_LETTERS.labels(SERVICE, stream.name, reason).inc(n)
            else:
                metrics.DUPLICATES.labels(SERVICE, stream.name).inc(n)


def _published_ms_is_last() -> bool:
    last = get_codec().by_name["Event"].parsed["fields"][-1]
    return last["name"] == "published_ms" and last["type"] == ["null", "long"]


PUBLISHED_MS_IS_LAST = _published_ms_is_last()


def stamp_published_ms(blob: bytes, old: int | None, ts_ms: int) -> bytes:
    """An Avro Event's bytes with `published_ms` = ts_ms, without decoding and encoding it again
    (the hot path): published_ms is Event's last field, so it is the tail of the message, a union
    branch (0 = null, 2 = long) and, for a long, its zigzag varint.

        >>> codec = get_codec()
        >>> e = {"event_id": "e", "entity_id": "m", "ts": 0.0, "fields": {}, "published_ms": None}
        >>> stamp_published_ms(codec.encode("Event", e), None, 17) == codec.encode("Event", {**e, "published_ms": 17})
        True
    """
    if not PUBLISHED_MS_IS_LAST:  # the schema changed shape: do it the slow, sure way
        record = get_codec().decode(blob, expect="Event")
        return get_codec().encode("Event", {**record, "published_ms": ts_ms})
    tail = 1 if old is None else 1 + len(write_long(old))
    return blob[:-tail] + b"\x02" + write_long(ts_ms)


def json_bytes(item: Any) -> bytes:
    """An item's JSON text as it will be kept in the DLQ (never raises)."""
    try:
        return json.dumps(item, ensure_ascii=True, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        return repr(item).encode("utf-8", "replace")


MARK_EVERY_S = 0.01  # acknowledged claims are marked published at most this long after (one script call)


class IngestionWorker(StreamWorker):
    """The Kafka door: consume -> decide (validate) -> claim ids -> produce; as Kafka acknowledges,
    mark the claims published; every commit_interval_s (run) flush, mark the rest, commit."""

    service = SERVICE

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        super().__init__(settings)
        self.batch_size = settings.ingestion.batch_size
        # Its own client, which waits out a Redis outage (the HTTP door's answers 503 at once).
        self.ingestor = Ingestor(settings, self.producer, client or deps.redis_client(settings))
        self.undelivered: list[KafkaError] = []
        self.acknowledged: list[Claim] = []  # claims whose output Kafka acknowledged, not yet marked
        self.marked_at = 0.0
        self.commit_interval_s = settings.ingestion.commit_interval_s

    @property
    def consumer_config(self) -> dict:
        """The producers' topics: no record of an aborted transaction; batched under kafka_fetch_batch_ms."""
        return {**kafka.INPUT_CONSUMER, **kafka.batched_fetch(self.settings)}

    def input_topics(self) -> list[str]:
        return [self.topics.events, self.topics.labels]

    def handle(self, messages: list[Message]) -> None:
        now = time.time()
        decisions = self.decide(messages, now)
        messages = messages[:len(decisions)]  # the rest waits for the schema registry

        def delivered(index: int, err: KafkaError | None) -> None:
            if err is not None:
                self.undelivered.append(err)
            elif decisions[index].claim is not None:  # a valid input's output (a dead letter has none)
                self.acknowledged.append(decisions[index].claim)

        self.ingestor.publish(decisions, "kafka", on_delivery=delivered)
        for m, d in zip(messages, decisions):
            if d.ts is not None:  # a duplicate too: the partition has got that far
                self.note_event_time(m.topic(), m.partition(), d.ts)

    def decide(self, messages: list[Message], now: float) -> list[Decision]:
        """The decisions on the messages, in order, up to the first whose writer schema the
        registry cannot give now: that one and the rest of the batch wait (`wait_for_registry`)."""
        decisions = []
        for i, m in enumerate(messages):
            try:
                decisions.append(self.ingestor.decide_message(m, now))
            except RegistryUnavailable:
                self.wait_for_registry(messages[i:])
                break
        return decisions

    def wait_for_registry(self, waiting: list[Message]) -> None:
        """Seek each partition back to its first waiting message, so that the next polls read them
        again, and pause until the registry may be asked again (the consumer stays in its group)."""
        first: dict[tuple[str, int], int] = {}
        for m in waiting:
            first.setdefault((m.topic(), m.partition()), m.offset())
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))
        pause = self.ingestor.registry.retry_at - time.monotonic()
        self._stop.wait(min(max(pause, 0.05), 2.0))

    def tick(self) -> None:
        # Mark what Kafka acknowledged soon, not only at the commit: an input redelivered after a
        # crash is then dropped as a duplicate unless its acknowledgement came in the last moment.
        if self.acknowledged and time.monotonic() - self.marked_at >= MARK_EVERY_S:
            self.mark_acknowledged()

    def mark_acknowledged(self) -> None:
        self.ingestor.dedup.mark_published(self.acknowledged)
        self.acknowledged = []
        self.marked_at = time.monotonic()

    def commit(self) -> None:
        # Never commit past an input whose output Kafka refused: stop instead; after the restart
        # Kafka redelivers the batch, and dedup's marker lets the same messages through again.
        if self.undelivered:
            raise RuntimeError(f"{len(self.undelivered)} messages not delivered, e.g. {self.undelivered[0]}")
        # Acknowledged (the loop flushed first): if the commit fails (a rebalance, the broker
        # away), the redelivered inputs must not be published again.
        self.mark_acknowledged()
        super().commit()


def build_app(settings: Settings) -> FastAPI:
    """The ingestion process: the Kafka door's worker and the HTTP door on one FastAPI app."""
    client = redis_clients.connect(settings.redis_url)
    worker = IngestionWorker(settings)  # its own client, which waits out a Redis outage
    door = HttpDoor(settings, Ingestor(settings, HttpDoor.producer(settings), client))  # answers 503 at once
    app = service_app(
        SERVICE, worker=worker, title="driftline ingestion", on_stop=door.close,
        max_body_bytes=settings.ingestion.max_http_body_bytes, body_limit_setting="ingestion.max_http_body_bytes",
        description="Validates events and labels from producers (Kafka or HTTP), drops duplicates, "
                    "and publishes them to events.valid / labels.valid; the rest goes to the DLQs with a reason.",
    )
    guard = DoorGuard.of(SERVICE, settings)
    app.include_router(router(door, guard))
    guard.document(app, ("/v1/events", "/v1/labels"))
    return app


def serve(settings: Settings) -> None:
    run_app(build_app(settings), settings.ports.ingestion, settings)
