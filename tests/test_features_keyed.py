"""Aggregates keyed by another field, against real Kafka and Redis: a merchant's state is folded
by every worker whose events name it, once each (two replicas, redelivery), and is read point in
time; vectors of /v1/predict's path (`FeatureStore.vector`) equal the service's."""

from __future__ import annotations

import random
from collections import defaultdict

from driftline.features.definitions import FeatureSet, FeatureSpec
from driftline.features.service import EVENT, FeaturesWorker, Item
from driftline.features.store import FeatureStore
from driftline.shared.keys import Keys
from driftline.shared.topics import Topics
from test_features_service import event, publish, read_topic, running

AGGREGATES = [
    {"key": "merchant", "fn": "count", "window": "10m", "name": "m_count_10m"},
    {"key": "merchant", "fn": "sum", "field": "amount", "window": "1h", "name": "m_sum_1h"},
    {"key": "merchant", "fn": "distinct", "field": "entity_id", "window": "1h", "name": "m_cards_1h"},
    {"fn": "count", "window": "1h", "name": "card_count_1h"},
]
# A lateness of a whole window: however far one replica runs ahead of the other, nothing is dropped
# (the skew hold bounds it in general; here the final state must hold every event exactly once).
FS = FeatureSet(FeatureSpec(name="keyed", fields=False, aggregate=AGGREGATES, lateness="1h"))


def stream(n: int, seed: int = 5) -> list[dict]:
    """Cards (entity ids, so spread over every partition) paying three merchants, one second apart."""
    rng = random.Random(seed)
    return [event(f"k{i}", f"card-{rng.randrange(40)}", 1000.0 + i, merchant=f"m{rng.randrange(3)}",
                  amount=float(rng.randrange(1, 50))) for i in range(n)]


def reference(events: list[dict]) -> dict[str, dict]:
    """Every event's vector, computed in one process in time order (the exact point-in-time values)."""
    cards: dict = defaultdict(dict)
    merchants: dict = defaultdict(dict)
    out = {}
    for ev in events:
        m = merchants[ev["fields"]["merchant"]]
        out[ev["event_id"]] = FS.vector(cards[ev["entity_id"]], ev["fields"], ev["ts"], keyed={"merchant": m})
        FS.apply_event(cards[ev["entity_id"]], ev["fields"], ev["ts"])
        FS.apply_keyed("merchant", m, ev["fields"], ev["ts"], ev["entity_id"])
    return out


def merchant_part(x: dict) -> dict:
    return {k: v for k, v in x.items() if k.startswith("m_")}


def final_merchants(settings, redis_client, probe_ts: float) -> dict[str, dict]:
    """Each merchant's aggregates as /v1/predict reads them for a new event at `probe_ts`."""
    store = FeatureStore(redis_client, Keys(settings.namespace), FS, 60)
    return {m: merchant_part(store.vector("nobody", {"merchant": m}, probe_ts)) for m in ("m0", "m1", "m2")}


def test_two_replicas_fold_every_event_into_its_merchant_once_and_never_read_a_later_one(settings, redis_client):
    events = stream(600)
    publish(settings, events=events)
    with running(settings, FS) as one, running(settings, FS) as two:  # two members of the features group
        got = {fv["event_id"]: fv["features"] for fv in read_topic(settings, "features", len(events), timeout=90)}
    counts = (one.counts, two.counts)
    expected = reference(events)
    assert got.keys() == expected.keys()
    for event_id, x in got.items():
        # card aggregates: one partition, one writer: exact; merchant ones: never more than the
        # point-in-time value (a later event never counts), at most what the other replica had not folded yet
        assert x["card_count_1h"] == expected[event_id]["card_count_1h"]
        assert x["m_count_10m"] <= expected[event_id]["m_count_10m"]
        assert x["m_sum_1h"] <= expected[event_id]["m_sum_1h"] + 1e-9
    # whatever the interleaving, each merchant's state holds every one of its events exactly once
    after = reference(events + [event(f"p{m}", "nobody", 1600.0, merchant=m) for m in ("m0", "m1", "m2")])
    assert final_merchants(settings, redis_client, 1600.0) == {m: merchant_part(after[f"p{m}"]) for m in ("m0", "m1", "m2")}, str(counts)


def test_a_redelivered_batch_folds_nothing_twice_into_its_merchants(settings, redis_client):
    topics = Topics(settings.namespace)
    events = stream(60, seed=6)
    offsets = {0: 10, 1: 10}
    items = []
    for ev in events:  # an entity's events on one partition, in offset order
        p = int(ev["entity_id"].rsplit("-", 1)[1]) % 2
        items.append(Item(EVENT, ev["ts"], topics.events_valid, p, offsets[p], ev))
        offsets[p] += 1
    worker = FeaturesWorker(settings, FS)
    worker.process(items)
    keys = Keys(settings.namespace)
    first = {m: redis_client.hgetall(keys.keyed_entity("merchant", m)) for m in ("m0", "m1", "m2")}
    worker.process(items)  # a crash after the Redis writes, before the commit
    worker.process(items[len(items) // 2:])  # or a restart from an earlier offset
    assert {m: redis_client.hgetall(keys.keyed_entity("merchant", m)) for m in ("m0", "m1", "m2")} == first
    assert worker.counts["redelivered"] == 90 and worker.counts["keyed_conflicts"] == 0
    after = reference(events + [event(f"p{m}", "nobody", 2000.0, merchant=m) for m in ("m0", "m1", "m2")])
    assert final_merchants(settings, redis_client, 2000.0) == {m: merchant_part(after[f"p{m}"]) for m in ("m0", "m1", "m2")}
    worker.producer.flush(10)
    vectors = read_topic(settings, "features", 60 + 90)
    assert {fv["event_id"]: fv["features"] for fv in vectors} == reference(events)  # one worker, time order: exact


def test_a_merchant_written_by_another_worker_meanwhile_is_read_again_and_refolded(settings, redis_client):
    topics = Topics(settings.namespace)
    events = stream(40, seed=7)
    a, b = FeaturesWorker(settings, FS), FeaturesWorker(settings, FS)
    ours = [Item(EVENT, ev["ts"], topics.events_valid, 0, i, ev) for i, ev in enumerate(events[:20])]
    theirs = [Item(EVENT, ev["ts"], topics.events_valid, 1, i, ev) for i, ev in enumerate(events[20:])]
    real_read = a.store.read_batch

    def read_then_the_other_worker_writes(*args, **kwargs):
        read = real_read(*args, **kwargs)
        b.process(theirs)  # between a's read and a's write
        return read

    a.store.read_batch = read_then_the_other_worker_writes
    a.process(ours)
    a.store.read_batch = real_read
    assert a.counts["keyed_conflicts"] >= 1
    after = reference(events + [event(f"p{m}", "nobody", 2000.0, merchant=m) for m in ("m0", "m1", "m2")])
    assert final_merchants(settings, redis_client, 2000.0) == {m: merchant_part(after[f"p{m}"]) for m in ("m0", "m1", "m2")}
    for w in (a, b):
        w.producer.flush(10)
