"""driftline.client: publish events and labels to driftline, and read what it answers, from Python.

    from driftline.client import Producer, Consumer

    with Producer("127.0.0.1:9092") as producer:           # flushes on exit; raises what failed
        event_id = producer.send_event("meter-7", {"load": 0.42, "temp": 17.5})
        producer.send_label(event_id, "1")                  # later, when the truth is known

    with Consumer("predictions", "outcomes", group="my-app", bootstrap="127.0.0.1:9092") as answers:
        for message in answers:                             # Message(topic, key, value)
            print(message.topic, message.value["event_id"], message.value["y_pred"])

The producer is Kafka's idempotent producer (acks=all, enable.idempotence: a retry never writes a
duplicate) with batching (linger, lz4), configured exactly as driftline's own services
(`driftline.shared.kafka.producer`), and writes Avro single-object messages with the current
`schemas/Event.avsc` / `Label.avsc`, keyed as the topics require (events by entity, labels by event).
A delivery that fails is never swallowed: it is collected in `failed` and `flush()` raises
`DeliveryError` with every failure (and when messages are still unacknowledged at its timeout).
A value the schema cannot hold (a field that is not a number, say) raises at `send_*`.

With a schema registry, the producer can write the Confluent wire format instead (00, the schema
id, the same Avro body), as Confluent's serializers do; driftline registers its schemas under
`<topic>-value` and uses their ids. The consumer reads either framing (it asks the registry for an
id it has not seen, once), so it follows `schema_registry_output`.

    Producer("127.0.0.1:9092", framing="confluent", schema_registry_url="http://127.0.0.1:8081")
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from .shared import kafka
from .shared.codec import DecodeError, get_codec
from .shared.framing import confluent_header, reframe
from .shared.schema_registry import RegistryUnavailable, SchemaRegistry, registry_for
from .shared.settings import Settings
from .shared.topics import Topics

__all__ = ["Producer", "Consumer", "Message", "DeliveryError", "Failure"]
log = logging.getLogger(__name__)


def _settings(bootstrap: str | None, namespace: str | None, settings: Settings | None,
              schema_registry_url: str | None = None) -> Settings:
    base = settings or Settings()
    changes: dict[str, Any] = {}
    if bootstrap is not None:
        changes["kafka_bootstrap"] = bootstrap
    if namespace is not None:
        changes["namespace"] = namespace
    if schema_registry_url is not None:
        changes["schema_registry_url"] = schema_registry_url
    return base.model_copy(update=changes) if changes else base


@dataclass(frozen=True)
class Failure:
    topic: str
    key: str
    error: str


class DeliveryError(RuntimeError):
    """Some messages were not acknowledged by Kafka; `failures` says which and why."""

    def __init__(self, failures: list[Failure], pending: int = 0) -> None:
        self.failures = failures
        self.pending = pending
        parts = [f"{len(failures)} message(s) failed"] if failures else []
        if pending:
            parts.append(f"{pending} still unacknowledged at the flush timeout")
        first = f"; first: {failures[0].topic} key={failures[0].key!r}: {failures[0].error}" if failures else ""
        super().__init__(", ".join(parts) + first)


class Producer:
    """Publishes events and labels to the `events` / `labels` topics (of `namespace`, if any).

    `bootstrap`, `namespace` and `schema_registry_url` override the settings (which otherwise come
    from DRIFTLINE_* variables, as for the services); extra keyword arguments are librdkafka
    settings. `framing` is "single-object" (Avro's own) or "confluent" (needs a registry)."""

    def __init__(self, bootstrap: str | None = None, *, namespace: str | None = None,
                 settings: Settings | None = None, framing: str = "single-object",
                 schema_registry_url: str | None = None, **config: Any) -> None:
        self.settings = _settings(bootstrap, namespace, settings, schema_registry_url)
        self.topics = Topics(self.settings.namespace)
        if framing not in ("single-object", "confluent"):
            raise ValueError(f"framing is 'single-object' or 'confluent', not {framing!r}")
        self._headers = self._confluent_headers() if framing == "confluent" else {}
        config.setdefault("linger.ms", 20)
        self._producer = kafka.producer(self.settings, **config)
        self._codec = get_codec()
        self.failed: list[Failure] = []
        self.delivered = 0

    def _confluent_headers(self) -> dict[str, bytes]:
        """Topic -> the Confluent header of driftline's schema, registered under `<topic>-value`."""
        if not self.settings.schema_registry_url:
            raise ValueError("framing='confluent' needs a schema registry: schema_registry_url=... or "
                             "DRIFTLINE_SCHEMA_REGISTRY_URL")
        ids = SchemaRegistry(self.settings.schema_registry_url).register(self.topics, ("events", "labels"))
        missing = {"events", "labels"} - set(ids)
        if missing:
            raise RuntimeError(f"the schema registry refused driftline's schema for {', '.join(sorted(missing))} "
                               "(a producer's evolution there is not compatible with it): see the log")
        return {self.topics.name(base): confluent_header(schema_id) for base, schema_id in ids.items()}

    def _on_delivery(self, err: KafkaError | None, msg) -> None:
        if err is None:
            self.delivered += 1
        else:
            key = msg.key().decode("utf-8", "replace") if msg.key() else ""
            self.failed.append(Failure(msg.topic(), key, str(err)))

    def _send(self, topic: str, key: str, value: bytes) -> None:
        if self._headers:
            value = reframe(value, self._headers[topic])
        kafka.produce(self._producer, topic, value, key=key, on_delivery=self._on_delivery)
        self._producer.poll(0)  # serve delivery reports as we go

    def send_event(self, entity_id: str, fields: Mapping[str, float], ts: float | None = None,
                   event_id: str | None = None) -> str:
        """Queue one event; returns its event_id (a new UUID unless given) for the label to name."""
        event_id = event_id or uuid.uuid4().hex
        record = {"event_id": event_id, "entity_id": entity_id, "ts": time.time() if ts is None else float(ts),
                  "fields": dict(fields), "published_ms": None}
        self._send(self.topics.events, entity_id, self._codec.encode("Event", record))
        return event_id

    def send_label(self, event_id: str, label: str | int | float | bool, ts: float | None = None) -> None:
        """Queue the true label of an earlier event. Numbers and booleans become text the way
        driftline's predictions are written (True -> "1", 3 -> "3", 12.5 -> "12.5")."""
        if isinstance(label, bool):
            label = int(label)
        record = {"event_id": event_id, "label": str(label), "ts": time.time() if ts is None else float(ts)}
        self._send(self.topics.labels, event_id, self._codec.encode("Label", record))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until Kafka acknowledged everything sent; raise DeliveryError for what it did not.
        Failures are reported once: after the raise, `failed` starts empty again."""
        pending = self._producer.flush(timeout)
        if self.failed or pending:
            failures, self.failed = self.failed, []
            raise DeliveryError(failures, pending)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.flush()
        else:  # do not hide the first error behind a delivery one
            self._producer.flush(5)


@dataclass(frozen=True)
class Message:
    topic: str  # the DESIGN.md name: predictions, outcomes, drift.events, ...
    key: str | None
    value: dict[str, Any]


class Consumer:
    """Reads driftline's output topics (predictions, outcomes, drift.events, model.swaps, ...),
    decoded to dicts in the current schema version.

    A message that is not a record of the topic's schema is not silently dropped: it is kept in
    `refused` (topic, partition, offset, reason) and logged. Offsets are committed as messages are
    handed out (at least once); `from_beginning=False` starts new groups at the end of the topics.
    With a schema registry, Confluent-framed messages are read too; one whose schema the registry
    cannot give now is read again by a later poll."""

    def __init__(self, *topics: str, group: str, bootstrap: str | None = None, namespace: str | None = None,
                 settings: Settings | None = None, from_beginning: bool = True,
                 schema_registry_url: str | None = None, **config: Any) -> None:
        self.settings = _settings(bootstrap, namespace, settings, schema_registry_url)
        names = Topics(self.settings.namespace)
        self._schema = {names.name(t): names.spec(names.name(t)).schema for t in topics or ("predictions",)}
        self._base = {full: names.base(full) for full in self._schema}
        # Offsets stored as messages are handed out (or refused), not as librdkafka fetches them.
        config = {"enable.auto.commit": True, "enable.auto.offset.store": False,
                  "auto.offset.reset": "earliest" if from_beginning else "latest", **config}
        self._consumer = kafka.consumer(self.settings, group, **config)
        self._consumer.subscribe(list(self._schema))
        self._reader = registry_for(self.settings) or get_codec()
        self.refused: list[tuple[str, int, int, str]] = []

    def poll(self, timeout: float = 1.0, max_messages: int = 500) -> list[Message]:
        """What arrived within `timeout` seconds (possibly nothing)."""
        out = []
        messages = self._consumer.consume(max_messages, timeout=timeout)
        for i, m in enumerate(messages):
            if m.error() is not None:
                log.warning("consumer error %s", m.error())
                continue
            try:
                value = self._reader.decode(m.value(), expect=self._schema[m.topic()])
            except DecodeError as exc:
                self.refused.append((self._base[m.topic()], m.partition(), m.offset(), exc.reason))
                log.warning("refused %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), exc)
                self._consumer.store_offsets(m)
                continue
            except RegistryUnavailable as exc:
                log.warning("%s; reading %s[%d] again from %d", exc, m.topic(), m.partition(), m.offset())
                self._read_again(messages[i:])
                break
            key = m.key().decode("utf-8", "replace") if m.key() else None
            out.append(Message(self._base[m.topic()], key, value))
            self._consumer.store_offsets(m)
        return out

    def _read_again(self, messages: list) -> None:
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            if m.error() is None:
                first.setdefault((m.topic(), m.partition()), m.offset())
        for (topic, partition), offset in first.items():
            self._consumer.seek(TopicPartition(topic, partition, offset))

    def __iter__(self) -> Iterator[Message]:
        while True:
            yield from self.poll()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
