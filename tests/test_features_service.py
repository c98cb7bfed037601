"""The features service against real Kafka and Redis: point-in-time vectors, label updates,
idempotent state (a batch applied twice, a kill -9 mid-stream), snapshots with their TTL."""

from __future__ import annotations

import math
import time
import uuid
from contextlib import contextmanager

import httpx
import pytest
from confluent_kafka import TopicPartition

from driftline.features.definitions import FeatureSet, FeatureSpec, load_feature_set
from driftline.features.service import EVENT, FeaturesWorker, Item
from driftline.features.store import LABEL_FIELDS, FeatureStore, decode_state
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.keys import Keys
from driftline.shared.topics import Topics

codec = get_codec()
HAND = FeatureSpec(name="hand", count=True, since_last=True, delta=["x"], last_label=True)


def event(event_id, entity_id, ts, **fields):
    return {"event_id": event_id, "entity_id": entity_id, "ts": ts, "fields": fields, "published_ms": 1234}


def label(event_id, value, ts):
    return {"event_id": event_id, "label": value, "ts": ts}


def publish(settings, events=(), labels=(), junk=()):
    topics = Topics(settings.namespace)
    p = kafka.producer(settings)
    for lb in labels:
        kafka.produce(p, topics.labels_valid, codec.encode("Label", lb), key=lb["event_id"])
    for ev in events:
        kafka.produce(p, topics.events_valid, codec.encode("Event", ev), key=ev["entity_id"])
    for blob in junk:
        kafka.produce(p, topics.events_valid, blob, key="junk")
    assert p.flush(30) == 0


def read_topic(settings, base, count, timeout=30.0, record="FeatureVector"):
    """The first `count` records on a topic (all partitions), read by a throwaway consumer group."""
    c = kafka.consumer(settings, f"probe-{uuid.uuid4().hex[:8]}")
    c.subscribe([Topics(settings.namespace).name(base)])
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error() is None:
                    out.append(codec.decode(m.value(), expect=record))
    finally:
        c.close()
    assert len(out) >= count, f"{len(out)} of {count} records on {base}"
    return out


@contextmanager
def running(settings, feature_set=None):
    """The features worker in this process (a thread), as `driftline serve features` runs it."""
    worker = FeaturesWorker(settings, feature_set)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        assert worker.error is None, repr(worker.error)


def test_vectors_are_point_in_time_correct_and_labels_only_reach_later_events(settings, redis_client):
    """Hand-checked: entity a has events at 100, 110, 120, 130, 140. Its labels are all sent
    before any event, yet each reaches only the events after its own time: label(e1)='1' known
    at 115 -> e3, e4; label(e3)='0' at 135 -> e5; label(e2)='1' arrives last (at 136) but
    belongs to an older event than e3, so the last known label stays '0'."""
    settings.features.max_reorder_wait_ms = 1500
    publish(
        settings,
        labels=[label("e1", "1", 115.0), label("e3", "0", 135.0), label("e2", "1", 136.0)],
        events=[event("e1", "a", 100.0, x=1.0), event("e2", "a", 110.0, x=4.0), event("e3", "a", 120.0, x=2.0),
                event("b1", "b", 125.0, x=10.0), event("e4", "a", 130.0, x=5.0), event("e5", "a", 140.0, x=5.0)],
    )
    with running(settings, FeatureSet(HAND)):
        got = {fv["event_id"]: fv for fv in read_topic(settings, "features", 6)}
    unknown = {"_last_label_known": 0.0}
    expected = {
        "e1": {"x": 1.0, "_count": 0.0, "_since_last": 0.0, "x_delta": 0.0, **unknown},
        "e2": {"x": 4.0, "_count": math.log1p(1), "_since_last": 10.0, "x_delta": 3.0, **unknown},
        "e3": {"x": 2.0, "_count": math.log1p(2), "_since_last": 10.0, "x_delta": -2.0,
               "_last_label_known": 1.0, "_last_label": 1.0},
        "b1": {"x": 10.0, "_count": 0.0, "_since_last": 0.0, "x_delta": 0.0, **unknown},  # a's labels stay a's
        "e4": {"x": 5.0, "_count": math.log1p(3), "_since_last": 10.0, "x_delta": 3.0,
               "_last_label_known": 1.0, "_last_label": 1.0},
        "e5": {"x": 5.0, "_count": math.log1p(4), "_since_last": 10.0, "x_delta": 0.0,
               "_last_label_known": 1.0, "_last_label": 0.0},
    }
    assert {e: fv["features"] for e, fv in got.items()} == expected
    assert {fv["feature_set"] for fv in got.values()} == {FeatureSet(HAND).name}
    assert {fv["published_ms"] for fv in got.values()} == {1234}
    store = FeatureStore(redis_client, Keys(settings.namespace), FeatureSet(HAND), 60)
    # every event's vector is kept for its label's join, exactly as published
    assert store.read_snapshots(list(expected)) == got
    state = store.read_states(["a"])["a"]
    assert (state["n"], state["ts"], state["prev:x"], state["label"], state["label_ts"]) == (5, 140.0, 5.0, "0", 120.0)


def test_events_of_a_stream_without_labels_do_not_wait_out_the_reorder_wait(settings):
    # Nothing is on its way on the labels side (ingestion has passed on every label published,
    # labels.valid is read to its end): the wait for older labels is over at once, not after an hour.
    settings.features.max_reorder_wait_ms = 3_600_000
    publish(settings, events=[event(f"n{i}", f"ent{i % 3}", 100.0 + i, x=float(i)) for i in range(30)])
    with running(settings, FeatureSet(HAND)) as worker:
        got = read_topic(settings, "features", 30, timeout=60)
        assert worker.buffer.pending == 0
    assert {fv["event_id"] for fv in got} == {f"n{i}" for i in range(30)}


def test_a_label_still_on_its_way_through_ingestion_holds_the_events_after_it(settings, redis_client, run_service):
    # The label is on `labels`, not yet validated: the events wait for it however long ingestion
    # takes (it could be older than any of them), then the one after it gets it in its vector.
    settings.features.max_reorder_wait_ms = 3_600_000
    topics = Topics(settings.namespace)
    p = kafka.producer(settings)
    kafka.produce(p, topics.labels, codec.encode("Label", label("w1", "1", 105.0)), key="w1")
    assert p.flush(30) == 0
    publish(settings, events=[event("w1", "a", 100.0, x=1.0), event("w2", "a", 110.0, x=2.0)])
    with running(settings, FeatureSet(HAND)) as worker:
        deadline = time.monotonic() + 30
        while worker.buffer.pending < 2:
            assert time.monotonic() < deadline, "the events were never read"
            time.sleep(0.05)
        time.sleep(3.0)  # ample for a wrong release (one came within ~0.1 s of the events being read)
        assert worker.buffer.pending == 2, "events went before a label on its way through ingestion"
        run_service("ingestion")
        got = {fv["event_id"]: fv for fv in read_topic(settings, "features", 2, timeout=60)}
    assert got["w1"]["features"]["_last_label_known"] == 0.0
    assert got["w2"]["features"]["_last_label_known"] == 1.0 and got["w2"]["features"]["_last_label"] == 1.0


def test_snapshots_expire_after_the_configured_ttl(settings, redis_client):
    settings.features.snapshot_ttl_s = 1234
    settings.features.entity_ttl_s = 5678
    settings.features.max_reorder_wait_ms = 50
    publish(settings, events=[event(f"s{i}", "a", float(i), x=float(i)) for i in range(3)])
    with running(settings):
        read_topic(settings, "features", 3)
    keys = Keys(settings.namespace)
    ttls = [redis_client.ttl(keys.snapshot(f"s{i}")) for i in range(3)]
    assert all(1200 < t <= 1234 for t in ttls), ttls
    assert 5600 < redis_client.ttl(keys.entity("a")) <= 5678  # an idle entity's state goes too


def test_raw_vectors_are_the_fields_alone_and_default_adds_online_features(settings, redis_client):
    settings.features.max_reorder_wait_ms = 50
    events = [event(f"r{i}", "m", 10.0 * i, price=0.5 + i, demand=2.0 * i) for i in range(4)]
    publish(settings, events=events)
    with running(settings, load_feature_set("raw")):
        raw = {fv["event_id"]: fv["features"] for fv in read_topic(settings, "features", 4)}
    assert raw == {e["event_id"]: e["fields"] for e in events}
    assert redis_client.exists(Keys(settings.namespace).entity("m")) == 0  # raw keeps no state

    other = settings.model_copy(update={"namespace": settings.namespace + "d"})
    kafka.ensure_topics(other)
    publish(other, events=events)
    with running(other, load_feature_set("default")):
        default = {fv["event_id"]: fv["features"] for fv in read_topic(other, "features", 4)}
    fs = load_feature_set("default")
    state: dict = {}
    for e in events:  # the same function, in process, gives the same vectors
        assert default[e["event_id"]] == fs.vector(state, e["fields"], e["ts"])
        fs.apply_event(state, e["fields"], e["ts"])
    assert set(default["r3"]) > set(raw["r3"]) and default["r3"]["price_delta"] == 1.0


def test_the_same_batch_applied_twice_leaves_the_same_state(settings, redis_client):
    topics = Topics(settings.namespace)
    fs = FeatureSet(FeatureSpec(name="t", count=True, delta=["x"], ewm_alphas=[0.3], ewm_fields=["x"]))
    worker = FeaturesWorker(settings, fs)
    items = [Item(EVENT, float(i), topics.events_valid, 2, 100 + i, event(f"i{i}", "a" if i % 3 else "b", float(i),
                                                                         x=float(i * i)))
             for i in range(9)]
    worker.process(items)
    keys = Keys(settings.namespace)
    first = {e: redis_client.hgetall(keys.entity(e)) for e in "ab"}
    worker.process(items)  # a redelivery: crash after the Redis write, before the commit
    assert {e: redis_client.hgetall(keys.entity(e)) for e in "ab"} == first
    assert first["a"][b"n"] == b"6" and first["a"][b"_off"] == b"108" and first["b"][b"n"] == b"3"
    assert worker.counts["redelivered"] == 9
    worker.producer.flush(10)
    vectors = read_topic(settings, "features", 18)
    by_id: dict[str, list] = {}
    for fv in vectors:
        by_id.setdefault(fv["event_id"], []).append(fv)
    # the redelivered events' vectors are published again, identical to the first ones
    assert all(len(v) == 2 and v[0] == v[1] for v in by_id.values())


def test_junk_on_events_valid_goes_to_the_dlq_and_the_stream_goes_on(settings):
    settings.features.max_reorder_wait_ms = 50
    publish(settings, events=[event("j1", "a", 1.0, x=1.0)], junk=[b"not avro", codec.encode("Label", label("x", "1", 0.0))])
    publish(settings, events=[event("j2", "a", 2.0, x=2.0)])
    with running(settings) as worker:
        fvs = read_topic(settings, "features", 2)
        dead = read_topic(settings, "events.dlq", 2, record="DeadLetter")
    assert sorted(fv["event_id"] for fv in fvs) == ["j1", "j2"]
    assert sorted(d["reason"] for d in dead) == ["not_avro", "wrong_schema"]
    assert {d["payload"] for d in dead} == {b"not avro", codec.encode("Label", label("x", "1", 0.0))}
    assert worker.counts["dead_letters"] == 2


def test_a_label_for_an_unknown_event_changes_no_state(settings, redis_client):
    settings.features.max_reorder_wait_ms = 50
    publish(settings, events=[event("u1", "a", 1.0, x=1.0)], labels=[label("nope", "1", 0.5)])
    with running(settings) as worker:
        read_topic(settings, "features", 1)
        deadline = time.monotonic() + 10
        while worker.counts["labels_unmatched"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert worker.counts["labels_unmatched"] == 1
    assert redis_client.hget(Keys(settings.namespace).entity("a"), "label") is None


def expected_states(fs: FeatureSet, events, labels) -> dict[str, dict]:
    """Final entity states of an uninterrupted run, computed in process with the same FeatureSet."""
    states: dict[str, dict] = {}
    where = {}
    for e in events:
        fs.apply_event(states.setdefault(e["entity_id"], {}), e["fields"], e["ts"])
        where[e["event_id"]] = (e["entity_id"], e["ts"])
    for lb in labels:  # label order does not matter: the last label by event time wins
        entity_id, ts = where[lb["event_id"]]
        fs.apply_label(states[entity_id], lb["label"], ts)
    return states


def test_kill_9_mid_stream_then_restart_gives_the_state_of_an_uninterrupted_run(settings, redis_client,
                                                                                 run_service):
    n_events, n_entities, delay = 8_000, 16, 3
    events = [event(f"k{i}", f"ent{i % n_entities}", 1000.0 + i, x=math.sin(i), y=float(i % 7)) for i in range(n_events)]
    labels = [label(f"k{i}", str(i % 2), 1000.0 + i + delay + 1e-3) for i in range(n_events - delay)]
    publish(settings, events=events, labels=labels)
    keys = Keys(settings.namespace)
    entities = [f"ent{j}" for j in range(n_entities)]

    def applied() -> int:
        return sum(int(redis_client.hget(keys.entity(e), "n") or 0) for e in entities)

    service = run_service("features", DRIFTLINE_FEATURES__BATCH_SIZE="200")
    deadline = time.monotonic() + 60
    while applied() < n_events // 4:
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.02)
    service.kill9()
    killed_at = applied()
    assert killed_at < n_events, "the stream was over before the kill; use more events"
    service.restart()
    deadline = time.monotonic() + 90
    while applied() < n_events or _lag(settings) > 0:
        assert time.monotonic() < deadline, f"applied {applied()} of {n_events}\n{service.log_tail()}"
        time.sleep(0.2)

    fs = load_feature_set("default")
    store = FeatureStore(redis_client, keys, fs, 60)
    got = store.read_states(entities)
    for state in got.values():
        state.pop("_off"), state.pop("_p")
    want = expected_states(fs, events, labels)
    diff = {(e, k): (got[e].get(k), want[e].get(k)) for e in want for k in set(got[e]) | set(want[e])
            if got[e].get(k) != want[e].get(k)}
    assert not diff, f"killed after {killed_at}: (entity, field): (got, uninterrupted) {sorted(diff.items())[:12]}"
    assert applied() == n_events  # no event counted twice
    snapshots = store.read_snapshots([e["event_id"] for e in events])
    assert len(snapshots) == n_events  # every event kept its vector
    health = httpx.get(service.url + "/health").json()
    print(f"killed after {killed_at} of {n_events} events; after the restart: {health}")


def _lag(settings) -> int:
    """What the features consumer group has not committed yet, over both input topics."""
    topics = Topics(settings.namespace)
    c = kafka.consumer(settings, topics.group("features"))
    try:
        parts = kafka.partitions_of(settings, topics.events_valid) + kafka.partitions_of(settings, topics.labels_valid)
        total = 0
        for tp in c.committed(parts, timeout=10):
            _low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            total += high - max(tp.offset, 0)
        return total
    finally:
        c.close()


@pytest.mark.parametrize("field", LABEL_FIELDS)
def test_label_fields_are_never_written_by_the_event_path(field, settings, redis_client):
    """An event's state write must not roll back a label another replica just recorded."""
    fs = FeatureSet(HAND)
    store = FeatureStore(redis_client, Keys(settings.namespace), fs, 60)
    pipe = redis_client.pipeline(transaction=False)
    store.queue_label(pipe, "a", "1", 50.0)
    pipe.execute()
    stale = {"n": 1, "ts": 1.0, "label": "0", "label_ts": 10.0}
    store.write_states({"a": stale})
    assert store.read_states(["a"])["a"][field] == {"label": "1", "label_ts": 50.0}[field]


def test_a_copy_of_an_event_published_again_upstream_is_folded_once(settings, redis_client):
    """An ingestion crash between Kafka's acknowledgement of a batch and its published mark sends
    that batch to events.valid a second time, at new offsets. Each copy is recognised
    by the event id its snapshot was folded under: the state counts every event once and no second
    vector is published, whether the copy comes in a later batch or in the same one."""
    topics = Topics(settings.namespace)
    fs = FeatureSet(FeatureSpec(name="t", count=True, delta=["x"]))
    worker = FeaturesWorker(settings, fs)

    def items(offset: int, n: int = 6):
        return [Item(EVENT, float(i), topics.events_valid, 1, offset + i, event(f"c{i}", "a", float(i), x=float(i)))
                for i in range(n)]

    worker.process(items(100))
    keys = Keys(settings.namespace)
    first = redis_client.hgetall(keys.entity("a"))
    worker.process(items(200))  # the copy, in a later batch
    worker.process(items(300, 3) + [Item(EVENT, 6.0, topics.events_valid, 1, 400, event("c6", "a", 6.0, x=6.0)),
                                    Item(EVENT, 6.0, topics.events_valid, 1, 401, event("c6", "a", 6.0, x=6.0))])
    state = redis_client.hgetall(keys.entity("a"))
    assert first[b"n"] == b"6" and state[b"n"] == b"7"  # c0..c6, each once
    assert worker.counts["duplicates"] == 6 + 3 + 1
    worker.producer.flush(10)
    vectors = read_topic(settings, "features", 7)
    time.sleep(1.0)
    c = kafka.consumer(settings, f"probe-{uuid.uuid4().hex[:8]}")
    try:
        total = sum(c.get_watermark_offsets(tp, timeout=10)[1] for tp in kafka.partitions_of(settings, topics.features))
    finally:
        c.close()
    assert total == 7 and sorted(fv["event_id"] for fv in vectors) == [f"c{i}" for i in range(7)]


def test_a_state_stored_before_the_numbers_were_packed_gives_the_same_vector_and_is_packed_by_its_next_write(
        settings, redis_client):
    """What a driftline before the packing left in Redis (each number its own text field) reads as
    it was, and the next write of that state packs its numbers and deletes their text copies."""
    topics, keys = Topics(settings.namespace), Keys(settings.namespace)
    fs = FeatureSet(HAND)
    state: dict = {}
    for i in range(3):
        fs.apply_event(state, {"x": float(i) / 3}, float(i))
    redis_client.hset(keys.entity("old"), mapping={k: repr(v) for k, v in state.items()})  # the old layout
    want = fs.vector(state, {"x": 5.0}, 3.5)

    worker = FeaturesWorker(settings, fs)
    worker.process([Item(EVENT, 3.5, topics.events_valid, 1, 10, event("p3", "old", 3.5, x=5.0))])
    worker.producer.flush(10)
    assert read_topic(settings, "features", 1)[0]["features"] == want

    stored = redis_client.hgetall(keys.entity("old"))
    assert {b"_x", b"_xn"} <= set(stored) and not {b"ts", b"prev:x"} & set(stored)  # no text copies left
    fs.apply_event(state, {"x": 5.0}, 3.5)
    assert {k: v for k, v in decode_state(stored).items() if k not in ("_off", "_p")} == state
