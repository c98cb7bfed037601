"""driftline in a schema-registry shop, against a real registry (Apicurio, its Confluent-compatible
API) and real clients: confluent-kafka's AvroSerializer / AvroDeserializer, a Java producer with
Apicurio's serde in Confluent mode, and driftline's own client, through the real services.

The registry starts once per session (a JVM, ~10 s); each test has its own namespace, so its own
`<topic>-value` subjects."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka.schema_registry import SchemaRegistryClient, record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from interop_java import JavaReference, schema_path
from pipeline import metric, start_pipeline

from driftline.client import Consumer, Producer
from driftline.infra import stack
from driftline.shared import kafka
from driftline.shared.codec import SCHEMAS_DIR
from driftline.shared.schema_registry import SchemaRegistry
from driftline.shared.topics import Topics

EVENT_SCHEMA = json.loads((SCHEMAS_DIR / "Event.avsc").read_text())
LABEL_SCHEMA = json.loads((SCHEMAS_DIR / "Label.avsc").read_text())


BASE = EVENT_SCHEMA["fields"]
CHANNEL = {"name": "channel", "type": "string", "default": "web"}


def attempts(avro_type: str) -> dict:
    return {"name": "attempts", "type": avro_type, "default": 0}


def event_schema(fields: list[dict]) -> str:
    return json.dumps({**EVENT_SCHEMA, "fields": fields})


def without(*names: str) -> list[dict]:
    return [f for f in BASE if f["name"] not in names]


# A producer's lineage of Event, each version BACKWARD-compatible with the one before.
WITH_CHANNEL = event_schema(BASE + [CHANNEL])  # a field added with a default
WITH_ATTEMPTS_INT = event_schema(BASE + [CHANNEL, attempts("int")])
WITH_ATTEMPTS_LONG = event_schema(BASE + [CHANNEL, attempts("long")])  # a type widened
WITHOUT_PUBLISHED = event_schema(without("published_ms") + [CHANNEL, attempts("long")])  # a defaulted field removed


def event(i: int, prefix: str, **extra) -> dict:
    return {"event_id": f"{prefix}{i}", "entity_id": f"ent-{i % 3}", "ts": time.time() - 60 + i * 0.01,
            "fields": {"x": i / 10, "kind": "a" if i % 2 else "b"}, **extra}


class Serializers:
    """confluent-kafka's AvroSerializer per writer schema, auto-registering under `<topic>-value`."""

    def __init__(self, url: str, topics: Topics) -> None:
        self.client = SchemaRegistryClient({"url": url})
        self.topics = topics

    def frame(self, topic: str, schema: str, value: dict, **conf) -> bytes:
        serializer = AvroSerializer(self.client, schema, conf={"auto.register.schemas": True, **conf})
        return serializer(value, SerializationContext(topic, MessageField.VALUE))


def consume_all(settings, *topics: str, expect: int, timeout: float = 60.0) -> dict[str, list]:
    """driftline's client consumer on these topics until `expect` messages came and a second passed
    quietly (it reads single-object only here: no registry in `settings`)."""
    out: dict[str, list] = {t: [] for t in topics}
    with Consumer(*topics, group=f"check-{time.monotonic_ns()}", settings=settings) as consumer:
        deadline, quiet = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline:
            got = consumer.poll(0.5)
            for m in got:
                out[m.topic].append(m.value)
            if got:
                quiet = time.monotonic()
            if sum(map(len, out.values())) >= expect and time.monotonic() - quiet > 1.0:
                break
        assert consumer.refused == [], consumer.refused
    return out


@pytest.fixture
def registry_url(schema_registry, settings) -> str:
    """The session registry, with driftline's schemas registered for this test's topics (as
    `driftline infra topics` does)."""
    SchemaRegistry(schema_registry.url).register(Topics(settings.namespace))
    return schema_registry.url


def test_the_registry_listens_on_loopback_only(schema_registry):
    pid = schema_registry.pid()
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    for table in ("tcp", "tcp6"):
        for line in open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN, one of its sockets
                listening.append(cols[1].split(":")[0])
    assert listening, "the registry listens on no port?"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert set(listening) <= loopback, listening


def test_producers_in_either_framing_and_compatible_evolutions_reach_events_valid_in_one_format(
        registry_url, settings, run_service):
    topics = Topics(settings.namespace)
    ingestion = run_service("ingestion", DRIFTLINE_SCHEMA_REGISTRY_URL=registry_url)
    ser = Serializers(registry_url, topics)
    sent: list[tuple[str, bytes, str]] = []  # (topic, value, key)
    n = 10
    for i in range(n):  # the shipped schema, through Confluent's serializer
        sent.append((topics.events, ser.frame(topics.events, json.dumps(EVENT_SCHEMA), event(i, "cur-", published_ms=None)),
                     f"ent-{i % 3}"))
    for prefix, schema, extra in (("chan-", WITH_CHANNEL, {"channel": "app"}),
                                  ("int-", WITH_ATTEMPTS_INT, {"channel": "app", "attempts": 3}),
                                  ("long-", WITH_ATTEMPTS_LONG, {"channel": "app", "attempts": 2**40}),
                                  ("nopub-", WITHOUT_PUBLISHED, {"channel": "app", "attempts": 1})):
        for i in range(n):
            value = event(i, prefix, **extra)
            if schema is not WITHOUT_PUBLISHED:
                value["published_ms"] = None
            sent.append((topics.events, ser.frame(topics.events, schema, value), f"ent-{i % 3}"))
    for i in range(n):  # labels, through Confluent's serializer
        sent.append((topics.labels, ser.frame(topics.labels, json.dumps(LABEL_SCHEMA),
                                              {"event_id": f"cur-{i}", "label": str(i % 2), "ts": time.time()}),
                     f"cur-{i}"))

    # Incompatible with the latest version: refused by the registry's own check, nothing is sent.
    with pytest.raises((SchemaRegistryError, SerializationError)) as refused:
        ts_as_text = [dict(f, type="string") if f["name"] == "ts" else f for f in without("published_ms")]
        ser.frame(topics.events, event_schema(ts_as_text + [CHANNEL, attempts("long")]),
                  {**event(0, "bad-"), "ts": "yesterday", "channel": "x", "attempts": 0})
    assert "409" in str(refused.value) or getattr(refused.value, "http_status_code", None) == 409
    # Accepted by BACKWARD, yet driftline's Event cannot read it (a field it needs, gone): DLQ.
    no_entity = event_schema(without("published_ms", "entity_id") + [CHANNEL, attempts("long")])
    lost = {k: v for k, v in event(0, "noent-", channel="x", attempts=0).items() if k != "entity_id"}
    sent.append((topics.events, ser.frame(topics.events, no_entity, lost), "ent-0"))
    # A record of another type on events (registered under its record name): DLQ.
    sent.append((topics.events, ser.frame(topics.events, json.dumps(LABEL_SCHEMA), {"event_id": "x", "label": "1", "ts": 1.0},
                                          **{"subject.name.strategy": record_subject_name_strategy}), "x"))
    producer = kafka.producer(settings)
    for topic, value, key in sent:
        kafka.produce(producer, topic, value, key)
    producer.flush(30)
    # driftline's own client, in both framings.
    with Producer(settings=settings) as single, Producer(settings=settings, framing="confluent",
                                                         schema_registry_url=registry_url) as confluent:
        for i in range(n):
            single.send_event(f"ent-{i % 3}", {"x": float(i)}, event_id=f"so-{i}")
            confluent.send_event(f"ent-{i % 3}", {"x": float(i)}, event_id=f"cc-{i}")

    valid_events = 7 * n
    out = consume_all(settings, "events.valid", "labels.valid", "events.dlq", expect=valid_events + n + 2)
    ids = sorted(e["event_id"] for e in out["events.valid"])
    assert ids == sorted(f"{p}{i}" for p in ("cur-", "chan-", "int-", "long-", "nopub-", "so-", "cc-") for i in range(n))
    assert all(e["published_ms"] for e in out["events.valid"])  # stamped from the Kafka timestamp
    assert sorted(lab["event_id"] for lab in out["labels.valid"]) == sorted(f"cur-{i}" for i in range(n))
    letters = {letter["reason"]: letter for letter in out["events.dlq"]}
    assert set(letters) == {"incompatible_schema", "wrong_schema"}
    assert "entity_id" in letters["incompatible_schema"]["detail"]
    assert "registry schema id" in letters["incompatible_schema"]["detail"]
    assert letters["incompatible_schema"]["payload"][:1] == b"\x00"  # the original bytes, for a replay
    assert metric(ingestion, "driftline_ingested_total", door="kafka", outcome="valid") == valid_events + n


class Gate:
    """A TCP forwarder to the registry that the test can shut (connections refused) and open again:
    the registry going away and coming back, as the service sees it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = stack.free_port()
        self.server: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def open(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def shut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.conns = []

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_events_wait_while_the_registry_is_away_and_none_is_dead_lettered(registry_url, schema_registry, settings,
                                                                           run_service):
    topics = Topics(settings.namespace)
    gate = Gate(schema_registry.port)
    gate_url = registry_url.replace(f":{schema_registry.port}/", f":{gate.port}/")
    ingestion = run_service("ingestion", DRIFTLINE_SCHEMA_REGISTRY_URL=gate_url)  # its registry: away
    ser = Serializers(registry_url, topics)  # the producer reaches the registry; ingestion does not
    n = 30
    producer = kafka.producer(settings)
    for i in range(n):
        kafka.produce(producer, topics.events, ser.frame(topics.events, json.dumps(EVENT_SCHEMA),
                                                         event(i, "w-", published_ms=None)), f"ent-{i % 3}")
    producer.flush(30)
    deadline = time.monotonic() + 30
    while "schema_registry" not in httpx.get(ingestion.url + "/ready").text:
        assert time.monotonic() < deadline, ingestion.log_tail()
        time.sleep(0.3)
    time.sleep(3)  # several retries' worth
    assert httpx.get(ingestion.url + "/ready").status_code == 503
    assert httpx.get(ingestion.url + "/health").status_code == 200  # waiting, not dead
    assert metric(ingestion, "driftline_ingested_total", door="kafka") == 0

    gate.open()
    try:
        out = consume_all(settings, "events.valid", "events.dlq", expect=n)
        assert sorted(e["event_id"] for e in out["events.valid"]) == sorted(f"w-{i}" for i in range(n))
        assert out["events.dlq"] == []
        assert metric(ingestion, "driftline_ingested_total", door="kafka", outcome="valid") == n
        deadline = time.monotonic() + 15
        while httpx.get(ingestion.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(ingestion.url + "/ready").text
            time.sleep(0.3)
    finally:
        gate.shut()


@pytest.mark.e2e
def test_a_java_apicurio_producer_in_confluent_mode_is_learned_from_and_confluent_consumers_read_the_outcomes(
        registry_url, schema_registry, settings, run_service, infra_settings):
    """Apicurio's serde (as-confluent, content ids) writes an evolved Event; ingestion, features,
    learner and drift run with `schema_registry_output`; confluent-kafka's AvroDeserializer reads
    the predictions and outcomes."""
    java = JavaReference.build(infra_settings.cache_dir)
    n = 300
    procs = start_pipeline(run_service, ("ingestion", "features", "learner", "drift"), features="raw",
                           DRIFTLINE_SCHEMA_REGISTRY_URL=registry_url,
                           DRIFTLINE_SCHEMA_REGISTRY_OUTPUT='["predictions", "outcomes"]')
    evolved_path = settings.home / "EventWithChannel.avsc"
    evolved_path.write_text(WITH_CHANNEL)
    out = java.run("produce-registry", settings.kafka_bootstrap, schema_registry.native_url, str(evolved_path),
                   schema_path("Label"), f"{settings.namespace}.events", f"{settings.namespace}.labels", str(n),
                   "ap-", str(n // 2), repr(float(int(time.time()) - 10 * n)))
    assert out == [f"produced {n}"]
    deadline = time.monotonic() + 180
    while metric(procs["learner"], "driftline_examples_learned_total", role="champion") < n:
        assert time.monotonic() < deadline, procs["learner"].log_tail()
        time.sleep(0.5)
    assert metric(procs["ingestion"], "driftline_ingested_total", outcome="dead_letter") == 0

    # A Confluent-world consumer: confluent-kafka's deserializer, the writer schema by id from the registry.
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": registry_url}))
    consumer = KafkaConsumer({**kafka.connection(settings), "group.id": "confluent-app", "auto.offset.reset": "earliest"})
    consumer.subscribe([f"{settings.namespace}.outcomes", f"{settings.namespace}.predictions"])
    read: dict[str, list] = {"outcomes": [], "predictions": []}
    try:
        while len(read["outcomes"]) < n or len(read["predictions"]) < n:
            assert time.monotonic() < deadline + 60, {k: len(v) for k, v in read.items()}
            for m in consumer.consume(500, timeout=0.5):
                assert m.error() is None and m.value()[:1] == b"\x00"
                base = m.topic().rsplit(".", 1)[-1]
                read[base].append(deserialize(m.value(), SerializationContext(m.topic(), MessageField.VALUE)))
    finally:
        consumer.close()
    champion = [o for o in read["outcomes"] if o["role"] == "champion"]
    assert sorted(o["event_id"] for o in champion) == sorted(f"ap-{i}" for i in range(n))
    assert all(o["y_true"] in ("0", "1") for o in champion)
    # driftline's own client reads them too, given the registry.
    with Consumer("outcomes", group="driftline-app", settings=settings, schema_registry_url=registry_url) as mine:
        got: list = []
        while len(got) < len(read["outcomes"]):
            assert time.monotonic() < deadline + 90
            got += mine.poll(0.5)
        assert mine.refused == []
    assert sorted(m.value["event_id"] for m in got) == sorted(o["event_id"] for o in read["outcomes"])
