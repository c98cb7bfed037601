"""Categorical fields are bounded in the features service: a field may take at most
features.max_categories distinct text values per model (real Kafka and Redis)."""

from __future__ import annotations

from driftline.features.store import Categories
from driftline.shared.codec import get_codec
from driftline.shared.keys import Keys
from test_features_service import event, publish, read_topic, running

codec = get_codec()


def test_a_field_takes_at_most_max_categories_distinct_text_values(settings, redis_client):
    settings.features.max_categories = 2
    settings.features.max_reorder_wait_ms = 50
    # One entity, so one partition: the values are admitted in this order (across partitions the
    # features service may take them in any order, and another value would be the third).
    publish(settings, events=[event("c1", "u1", 1.0, country="KR", amount=1.0),
                              event("c2", "u1", 2.0, country="FR", amount=2.0),
                              event("c3", "u1", 3.0, country="US", amount=3.0),   # a third value: refused
                              event("c4", "u1", 4.0, country="KR", amount=4.0)])
    with running(settings) as worker:
        letter, = read_topic(settings, "events.dlq", 1, record="DeadLetter")
        vectors = read_topic(settings, "features", 3)
    assert letter["reason"] == "too_many_categories" and "country=US" in letter["detail"]
    assert codec.decode(letter["payload"], expect="Event")["event_id"] == "c3"
    assert {v["event_id"]: v["features"]["country"] for v in vectors} == {"c1": "KR", "c2": "FR", "c4": "KR"}
    assert worker.counts["dead_letters"] == 1
    stored = redis_client.smembers(Keys(settings.namespace).categories("default", "country"))
    assert {v.decode() for v in stored} == {"KR", "FR"}


def test_categories_are_admitted_per_field(settings, redis_client):
    cats = Categories(redis_client, Keys(settings.namespace), "m", limit=1)
    assert cats.admit({"country": {"KR"}, "device": {"ios"}}) == set()
    assert cats.admit({"country": {"FR", "KR"}}) == {("country", "FR")}
