"""The ingestion service on real Kafka and Redis: through either door (Avro on the `events` /
`labels` topics, JSON over HTTP) every input ends in exactly one of valid / dead letter / duplicate,
the DLQ keeps why and the original bytes, and no input, however odd, breaks the service."""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from driftline.ingestion.dedup import Claim, Dedup
from driftline.ingestion.service import build_app, stamp_published_ms
from driftline.ingestion.validate import Rejection, check_event
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.keys import Keys
from driftline.shared.topics import Topics

NOW = time.time()
codec = get_codec()


# -- helpers ------------------------------------------------------------------------------------

def event(event_id: str, entity_id: str = "meter-7", ts: float = NOW, **fields: float) -> dict:
    return {"event_id": event_id, "entity_id": entity_id, "ts": ts, "fields": fields or {"x": 1.0}}


def avro(record: str, value: dict) -> bytes:
    return codec.encode(record, {"published_ms": None, **value} if record == "Event" else value)


def publish(settings, topic: str, messages: list[tuple[str | None, bytes | None]]) -> None:
    p = kafka.producer(settings)
    for key, value in messages:
        kafka.produce(p, topic, value, key)
    assert p.flush(30) == 0


def read_topic(settings, topic: str) -> list:
    """Every message now in `topic`, partition by partition, each in offset order."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "test-reader",
                  "enable.auto.commit": False})
    try:
        out = []
        for tp in kafka.partitions_of(settings, topic):
            low, high = c.get_watermark_offsets(tp, timeout=10)
            if high <= low:
                continue
            c.assign([TopicPartition(topic, tp.partition, low)])
            got = []
            while len(got) < high - low:
                got += [m for m in c.consume(500, timeout=1.0) if m.error() is None]
            out += got
        return out
    finally:
        c.close()


def ingested(url: str) -> Counter:
    """driftline_ingested_total as {(door, topic, outcome): n}, from the service's /metrics."""
    counts: Counter = Counter()
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        if family.name == "driftline_ingested":
            for s in family.samples:
                if s.name.endswith("_total"):
                    counts[(s.labels["door"], s.labels["topic"], s.labels["outcome"])] += int(s.value)
    return counts


def wait_decided(url: str, door: str, topic: str, n: int, timeout: float = 30.0) -> Counter:
    """Wait until the service has decided on `n` inputs of one door and topic; returns the counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = ingested(url)
        done = sum(v for (d, t, _), v in counts.items() if (d, t) == (door, topic))
        if done >= n or time.monotonic() > deadline:
            assert done == n, f"{door}/{topic}: decided on {done} inputs, sent {n}: {counts}"
            return counts
        time.sleep(0.2)


def post(url: str, path: str, body, client: httpx.Client | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (client or httpx).post(url + path, content=content, headers={"content-type": "application/json"},
                                  timeout=30)


# -- conservation through both doors ----------------------------------------------------------------

def test_every_event_ends_in_exactly_one_of_valid_dlq_or_duplicate_through_both_doors(settings, run_service):
    svc = run_service("ingestion", DRIFTLINE_INGESTION__MAX_EVENT_BYTES="2048")
    topics = Topics(settings.namespace)
    good = [event(f"g{i}", x=float(i)) for i in range(20)]
    bad_kafka = {  # what we send -> the reason we expect
        "junk": ("not_avro", b"definitely not avro"),
        "empty": ("not_avro", b""),
        "foreign": ("unknown_schema", b"\xc3\x01" + b"\x07" * 8 + b"body"),
        "label": ("wrong_schema", avro("Label", {"event_id": "g1", "label": "1", "ts": NOW})),
        "cut": ("corrupt_avro", avro("Event", event("cut"))[:-4]),
        "huge": ("oversized", avro("Event", event("huge", **{f"f{i}": 1.0 for i in range(200)}))),
        "noid": ("missing_id", avro("Event", event(""))),
        "longid": ("id_too_long", avro("Event", event("L" * 300))),
        "nan": ("non_finite", avro("Event", event("nan", x=math.nan))),
        "vast": ("number_out_of_range", avro("Event", event("vast", x=1e200))),
        "future": ("bad_ts", avro("Event", event("future", ts=NOW + 10 * 86400))),
        "past": ("bad_ts", avro("Event", event("past", ts=-1.0))),
    }
    messages = [("meter-7", avro("Event", e)) for e in good]
    messages += [(f"k-{name}", blob) for name, (_, blob) in bad_kafka.items()]
    messages += [("meter-7", avro("Event", e)) for e in good[:5]]  # redelivered by the producer
    messages += [("meter-9", avro("Event", event("g5", "meter-9", y=2.0)))]  # same id, other content
    publish(settings, topics.events, messages)
    kafka_counts = wait_decided(svc.url, "kafka", "events", len(messages))
    assert kafka_counts[("kafka", "events", "valid")] == 20
    assert kafka_counts[("kafka", "events", "dead_letter")] == len(bad_kafka)
    assert kafka_counts[("kafka", "events", "duplicate")] == 6

    body = [event(f"h{i}", "meter-8") for i in range(10)]
    body += [event("g6"), event("h0", "meter-8")]  # already seen: through the other door, in this body
    bad_http = [({**event("s"), "fields": {"x": ["1.5"]}}, "non_numeric"),
                ({"event_id": "m", "ts": NOW, "fields": {}}, "missing_id"),
                (5, "not_an_object"),
                (event("n", x=math.nan), "non_finite"),  # the JSON text carries NaN
                (event("v", x=-1e200), "number_out_of_range"),
                (event("b", x=True), "non_numeric")]
    body += [item for item, _ in bad_http]
    r = post(svc.url, "/v1/events", body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["accepted"] == 10 and answer["duplicates"] == 2
    assert [(x["index"], x["reason"]) for x in answer["rejected"]] == [
        (12 + i, reason) for i, (_, reason) in enumerate(bad_http)]
    assert all(x["detail"] for x in answer["rejected"])
    http_counts = ingested(svc.url)
    assert sum(v for (d, t, _), v in http_counts.items() if (d, t) == ("http", "events")) == len(body)

    # What landed: each good id exactly once, keyed by its entity, per-entity order kept.
    valid = read_topic(settings, topics.events_valid)
    records = [codec.decode(m.value(), expect="Event") for m in valid]
    ids = [r["event_id"] for r in records]
    assert sorted(ids) == sorted([f"g{i}" for i in range(20)] + [f"h{i}" for i in range(10)])
    assert all(m.key().decode() == r["entity_id"] for m, r in zip(valid, records))
    assert all(r["published_ms"] for r in records), "published_ms is set for latency"
    # (g5 may win on meter-9: the two g5s are on different partitions, which have no order between them)
    g_order = [int(r["event_id"][1:]) for r in records if r["entity_id"] == "meter-7" and r["event_id"][0] == "g"]
    assert len(g_order) >= 19 and g_order == sorted(g_order), "one entity's events keep their order"

    letters = [codec.decode(m.value(), expect="DeadLetter") for m in read_topic(settings, topics.events_dlq)]
    assert len(letters) == len(bad_kafka) + len(bad_http)
    from_kafka = {letter["key"].decode(): letter for letter in letters if letter["partition"] is not None}
    for name, (reason, blob) in bad_kafka.items():
        letter = from_kafka[f"k-{name}"]
        assert (letter["reason"], letter["payload"]) == (reason, blob), name
        assert letter["detail"] and letter["offset"] is not None and letter["source_topic"] == topics.events
    from_http = [letter for letter in letters if letter["partition"] is None]
    assert Counter(x["reason"] for x in from_http) == Counter(reason for _, reason in bad_http)
    assert all(letter["source_topic"] == "http:/v1/events" for letter in from_http)
    assert sorted(letter["payload"] for letter in from_http) == sorted(
        json.dumps(item, separators=(",", ":")).encode() for item, _ in bad_http)


def test_records_of_an_aborted_producer_transaction_are_never_ingested(settings, run_service):
    """A producer may write `events` in transactions (Kafka's exactly-once producers do): what it
    aborted must not reach events.valid, what it committed must, once. driftline's own topics are
    read without that filter (nothing there is transactional); this door keeps it."""
    svc = run_service("ingestion")
    topics = Topics(settings.namespace)
    tx = kafka.producer(settings, **{"transactional.id": f"test-tx-{settings.namespace}"})
    tx.init_transactions(30)
    tx.begin_transaction()
    for i in range(3):
        tx.produce(topics.events, avro("Event", event(f"aborted-{i}")), "meter-7")
    tx.flush(30)
    tx.abort_transaction(30)
    tx.begin_transaction()
    for i in range(3):
        tx.produce(topics.events, avro("Event", event(f"committed-{i}")), "meter-7")
    tx.commit_transaction(30)
    publish(settings, topics.events, [("meter-7", avro("Event", event("plain")))])
    counts = wait_decided(svc.url, "kafka", "events", 4)
    assert counts[("kafka", "events", "valid")] == 4
    ids = [codec.decode(m.value(), expect="Event")["event_id"] for m in read_topic(settings, topics.events_valid)]
    assert ids == ["committed-0", "committed-1", "committed-2", "plain"]


def test_every_label_ends_in_exactly_one_of_valid_dlq_or_duplicate_through_both_doors(settings, run_service):
    svc = run_service("ingestion")
    topics = Topics(settings.namespace)
    labels = [{"event_id": f"e{i}", "label": str(i % 2), "ts": NOW} for i in range(10)]
    bad = {"junk": ("not_avro", b"\x00\x01"),
           "event": ("wrong_schema", avro("Event", event("e99"))),
           "blank": ("empty_label", avro("Label", {"event_id": "e50", "label": "  ", "ts": NOW})),
           "noid": ("missing_id", avro("Label", {"event_id": "", "label": "1", "ts": NOW}))}
    messages = [(x["event_id"], avro("Label", x)) for x in labels]
    messages += [(name, blob) for name, (_, blob) in bad.items()] + [("e3", avro("Label", labels[3]))]
    publish(settings, topics.labels, messages)
    counts = wait_decided(svc.url, "kafka", "labels", len(messages))
    assert (counts[("kafka", "labels", "valid")], counts[("kafka", "labels", "dead_letter")],
            counts[("kafka", "labels", "duplicate")]) == (10, 4, 1)

    r = post(svc.url, "/v1/labels", [{"event_id": "e20", "label": 1, "ts": NOW}, {"event_id": "e4", "label": "0",
              "ts": NOW}, {"event_id": "e21", "label": "", "ts": NOW}, {"event_id": "e22", "label": "1"}])
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1, "duplicates": 1, "rejected": [
        {"index": 2, "reason": "empty_label", "detail": "label is empty or blank"},
        {"index": 3, "reason": "missing_field", "detail": "ts is missing"}]}

    valid = read_topic(settings, topics.labels_valid)
    assert sorted(m.key().decode() for m in valid) == sorted([f"e{i}" for i in range(10)] + ["e20"])
    by_id = {m.key().decode(): m.value() for m in valid}
    assert by_id["e3"] == avro("Label", labels[3]), "a valid Avro label is passed on untouched"
    assert codec.decode(by_id["e20"], expect="Label")["label"] == "1"
    letters = [codec.decode(m.value(), expect="DeadLetter") for m in read_topic(settings, topics.labels_dlq)]
    assert Counter(x["reason"] for x in letters) == Counter(
        [reason for reason, _ in bad.values()] + ["empty_label", "missing_field"])
    assert {x["key"]: x["payload"] for x in letters if x["key"]} == {k.encode(): b for k, (_, b) in bad.items()}


def test_http_door_refuses_bad_bodies_whole_with_4xx_and_publishes_nothing(settings, run_service):
    svc = run_service("ingestion", DRIFTLINE_INGESTION__MAX_HTTP_BODY_BYTES="1000",
                      DRIFTLINE_INGESTION__MAX_HTTP_ITEMS="3")
    topics = Topics(settings.namespace)
    big = json.dumps([event(f"e{i}") for i in range(30)]).encode()
    r = post(svc.url, "/v1/events", big)
    assert r.status_code == 413 and "max_http_body_bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the cap holds while the body streams in
        for _ in range(100):
            yield b" " * 100

    r = httpx.post(svc.url + "/v1/events", content=chunks(), timeout=30)
    assert r.status_code == 413, r.text
    r = post(svc.url, "/v1/events", [event(f"e{i}") for i in range(4)])
    assert r.status_code == 413 and "max_http_items" in r.json()["detail"]
    r = post(svc.url, "/v1/events", b'{"event_id": "e1", ')
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed JSON: Expecting")
    r = post(svc.url, "/v1/labels", b"\xff\xfe not utf-8")
    assert r.status_code == 400
    r = post(svc.url, "/v1/events", b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code in (400, 413)
    for body in ("just a string", 42, None):
        r = post(svc.url, "/v1/labels", body)
        assert r.status_code == 422 and "object or an array" in r.json()["detail"]
    assert post(svc.url, "/v1/events", []).json() == {"accepted": 0, "duplicates": 0, "rejected": []}
    assert httpx.get(svc.url + "/health").status_code == 200
    for topic in (topics.events_valid, topics.events_dlq, topics.labels_valid, topics.labels_dlq):
        assert read_topic(settings, topic) == [], topic


def test_openapi_documents_both_doors_with_examples(settings):
    spec = build_app(settings).openapi()
    for path in ("/v1/events", "/v1/labels"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["examples"]["one"]["value"]["event_id"] == "e-1"
        assert {"200", "400", "413", "422"} <= set(spec["paths"][path]["post"]["responses"])


@pytest.mark.parametrize("old", [None, 0, -1, 64, 1_700_000_000_000, 2**63 - 1, -(2**63)])
@pytest.mark.parametrize("new", [0, 1, 1_795_000_000_000])
def test_stamping_published_ms_gives_the_same_bytes_as_encoding_again(old, new):
    e = {**event("e" * 200, x=1.5, y=-2.0), "published_ms": old}
    assert stamp_published_ms(codec.encode("Event", e), old, new) == codec.encode("Event", {**e, "published_ms": new})


# -- dedup --------------------------------------------------------------------------------------

def test_a_redelivered_input_is_not_a_duplicate_of_itself_but_a_resent_one_is(settings, redis_client):
    keys = Keys(settings.namespace)
    dedup = Dedup(redis_client, keys, ttl_s=60)
    first = Claim(keys.seen_event("e1"), "0:17")
    assert dedup.claim([first, Claim(keys.seen_event("e1"), "0:18"), Claim(keys.seen_event("e2"), "0:19")]) == [
        True, False, True]
    assert dedup.claim([first]) == [True], "the same message after a crash before commit"
    assert dedup.claim([Claim(keys.seen_event("e1"), "h-other:0")]) == [False]
    assert 0 < redis_client.ttl(keys.seen_event("e1")) <= 60
    dedup.release([Claim(keys.seen_event("e1"), "not-the-owner")])
    assert redis_client.exists(keys.seen_event("e1"))
    dedup.release([first])
    assert dedup.claim([Claim(keys.seen_label("e1"), "x"), Claim(keys.seen_event("e1"), "y")]) == [True, True]


# -- fuzz ---------------------------------------------------------------------------------------

ids = st.sampled_from(["a", "b", "c", "d", ""]) | st.text(max_size=4) | st.integers() | st.none()
numbers = st.floats() | st.integers(-(10**20), 10**20) | st.just(NOW)
json_values = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=4), max_leaves=12)
names = st.sampled_from(["a", "b", "c", "d", "e", "f"])
event_ids = st.integers(0, 300).map(lambda i: f"id-{i}")  # small enough that duplicates happen
finite = st.floats(-1e6, 1e6) | st.integers(-1000, 1000)
good_items = {  # mostly valid, now and then not (NaN, inf, huge numbers, blank labels)
    "events": st.fixed_dictionaries(
        {"event_id": event_ids, "entity_id": names, "ts": st.floats(0, NOW),
         "fields": st.dictionaries(names, finite | finite | st.floats() | st.integers(-(10**400), 10**400),
                                   max_size=4)}),
    "labels": st.fixed_dictionaries({"event_id": event_ids, "label": names | st.integers() | st.booleans() | st.text(),
                                     "ts": st.floats(0, NOW)}),
}
odd_item = st.fixed_dictionaries(
    {"event_id": ids, "entity_id": ids, "ts": numbers | json_values,
     "fields": st.dictionaries(st.text(max_size=6), numbers | json_values, max_size=5) | json_values},
    optional={"label": json_values}) | json_values


def body_for(stream: str) -> st.SearchStrategy[bytes]:
    good, odd = good_items[stream], odd_item
    items = st.lists(st.one_of(good, good, good, odd), min_size=1, max_size=8)
    as_json = st.one_of(items, items, items, good, odd).map(lambda v: json.dumps(v).encode())
    return st.one_of(as_json, as_json, as_json, st.binary(max_size=64))


FUZZ = hsettings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_http_door_fuzz_never_answers_5xx_and_counts_add_up(settings, run_service):
    svc = run_service("ingestion")
    topics = Topics(settings.namespace)
    totals: Counter = Counter()
    client = httpx.Client()

    @FUZZ
    @given(stream=st.sampled_from(["events", "labels"]), data=st.data())
    def post_anything(stream: str, data) -> None:
        body = data.draw(body_for(stream))
        r = post(svc.url, f"/v1/{stream}", body, client)
        assert r.status_code in (200, 400, 413, 422), (r.status_code, r.text)
        if r.status_code != 200:
            return
        parsed = json.loads(body)
        n = len(parsed) if isinstance(parsed, list) else 1
        answer = r.json()
        assert answer["accepted"] + answer["duplicates"] + len(answer["rejected"]) == n
        totals[(stream, "valid")] += answer["accepted"]
        totals[(stream, "duplicate")] += answer["duplicates"]
        totals[(stream, "dead_letter")] += len(answer["rejected"])

    # A known mix first, so that every outcome is exercised whatever the fuzzer draws.
    known = {"events": [event(f"k{i}") for i in range(5)] + [event("k0"), {"event_id": "k9"}],
             "labels": [{"event_id": f"k{i}", "label": "1", "ts": NOW} for i in range(5)] + [
                 {"event_id": "k0", "label": "0", "ts": NOW}, {"event_id": "k9"}]}
    for stream, items in known.items():
        answer = post(svc.url, f"/v1/{stream}", items, client).json()
        assert (answer["accepted"], answer["duplicates"], len(answer["rejected"])) == (5, 1, 1)
        totals.update({(stream, "valid"): 5, (stream, "duplicate"): 1, (stream, "dead_letter"): 1})
    post_anything()
    client.close()
    counts = ingested(svc.url)
    for stream in ("events", "labels"):
        for outcome in ("valid", "dead_letter", "duplicate"):
            assert counts[("http", stream, outcome)] == totals[(stream, outcome)], (stream, outcome)
        assert len(read_topic(settings, topics.name(f"{stream}.valid"))) == totals[(stream, "valid")]
        assert len(read_topic(settings, topics.name(f"{stream}.dlq"))) == totals[(stream, "dead_letter")]
    assert httpx.get(svc.url + "/health").status_code == 200


def mutate(blob: bytes, at: int, how: int, byte: int) -> bytes:
    at %= len(blob)
    if how == 0:  # overwrite one byte
        return blob[:at] + bytes([byte]) + blob[at + 1:]
    if how == 1:  # truncate
        return blob[:at]
    if how == 2:  # insert
        return blob[:at] + bytes([byte]) + blob[at:]
    return blob[:at] + blob[at + 1:]  # delete


valid_blobs = st.builds(lambda i, x: avro("Event", event(f"v{i}", f"m{i % 3}", x=x)),
                        st.integers(0, 30), st.floats(allow_nan=False, allow_infinity=False))
avro_messages = (st.binary(max_size=80)
                 | valid_blobs
                 | st.builds(mutate, valid_blobs, st.integers(0, 10**6), st.integers(0, 3), st.integers(0, 255))
                 | st.builds(lambda b: b"\xc3\x01" + b, st.binary(max_size=40)))


def test_avro_door_fuzz_keeps_the_service_healthy_and_counts_add_up(settings, run_service):
    svc = run_service("ingestion")
    topics = Topics(settings.namespace)
    producer = kafka.producer(settings)
    sent = []

    @FUZZ
    @given(batch=st.lists(avro_messages, min_size=1, max_size=8))
    def publish_anything(batch: list[bytes]) -> None:
        for blob in batch:
            kafka.produce(producer, topics.events, blob, b"fuzz")
        sent.extend(batch)

    publish_anything()
    assert producer.flush(30) == 0
    counts = wait_decided(svc.url, "kafka", "events", len(sent), timeout=60)
    assert httpx.get(svc.url + "/health").status_code == 200
    valid = read_topic(settings, topics.events_valid)
    dead = read_topic(settings, topics.events_dlq)
    assert len(valid) == counts[("kafka", "events", "valid")] > 0
    assert len(dead) == counts[("kafka", "events", "dead_letter")] > 0
    assert len(valid) + len(dead) + counts[("kafka", "events", "duplicate")] == len(sent)
    limits = settings.ingestion
    for m in valid:  # whatever got through is a valid event, once
        assert not isinstance(check_event(codec.decode(m.value(), expect="Event"), limits, time.time()), Rejection)
    assert len({codec.decode(m.value())["event_id"] for m in valid}) == len(valid)
    assert Counter(codec.decode(m.value())["payload"] for m in dead) <= Counter(sent)
