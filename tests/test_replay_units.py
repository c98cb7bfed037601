"""The replay's pure parts: datasets, the publication schedule, the report and its plot."""

from __future__ import annotations

import gzip
import json

import pytest

from driftline.replay import datasets, order
from driftline.replay.datasets import DatasetError, load
from driftline.replay.plot import plot_report
from driftline.replay.publish import LABEL_EPSILON_S, event_ts, label_ts, schedule
from driftline.replay.report import REPORT_KEYS, build_report, prequential, short_model_name


def test_elec2_is_the_full_stream_in_file_order_with_one_entity():
    ds = load("elec2")
    rows = list(ds.rows())
    assert ds.size == len(rows) == 45_312
    fields, label, entity = rows[0]
    assert fields == {"period": 0.0, "nswprice": 0.056443, "nswdemand": 0.439155, "vicprice": 0.003467,
                      "vicdemand": 0.422915, "transfer": 0.414912}
    assert label == "1" and {r[2] for r in rows} == {"elec2"}
    assert {r[1] for r in rows} == {"0", "1"}


@pytest.mark.parametrize("name", datasets.GENERATORS)
def test_generators_are_seeded_numeric_and_carry_their_drift_positions(name):
    ds = load(name)
    first = list(_take(ds.rows(), 50))
    assert first == list(_take(ds.rows(), 50)), "the same rows every time"
    for fields, label, _entity in first:
        assert fields and all(isinstance(k, str) and isinstance(v, float) for k, v in fields.items())
        assert label in {"0", "1"} if name not in datasets.REGRESSION else float(label) == float(label)
    assert ds.size == 20_000
    if "stationary" in name or name == "hyperplane":
        assert ds.drift_positions == ()
    else:
        assert ds.drift_positions == (10_000,)
        assert ds.size - ds.drift_positions[0] >= 10_000, "bench drift scores the 10,000 rows after the drift"


def test_abrupt_drift_changes_the_concept_exactly_at_its_position():
    # Agrawal function 0 labels by age alone: a row's label before the drift follows it, after not.
    rows = list(_take(load("agrawal-abrupt").rows(), 11_000))

    def f0(x):
        return "1" if x["age"] < 40 or x["age"] >= 60 else "0"

    before = sum(f0(x) == y for x, y, _ in rows[:10_000]) / 10_000
    after = sum(f0(x) == y for x, y, _ in rows[10_000:]) / 1_000
    assert before == 1.0 and after < 0.5


def test_csv_dataset_keeps_text_as_categories_skips_missing_and_names_entities(tmp_path):
    path = tmp_path / "shop.csv"
    path.write_text("amount,city,user,bought\n1.5,Paris,u1,yes\n,Lyon,u2,no\n2,nan,,yes\n")
    ds = load(f"csv:{path}", target="bought", entity="user")
    assert ds.size == 3
    assert list(ds.rows()) == [
        ({"amount": 1.5, "city": "Paris"}, "yes", "u1"),
        ({"city": "Lyon"}, "no", "u2"),
        ({"amount": 2.0}, "yes", "shop"),
    ]


def test_friedman_datasets_are_regression_streams_with_the_drift_where_they_say():
    from river import linear_model, metrics, preprocessing

    for name in ("friedman-abrupt", "friedman-gradual"):
        ds = load(name)
        rows = list(ds.rows())
        assert ds.drift_positions == (10_000,) and len(rows) == 20_000
        assert all(isinstance(float(y), float) for _, y, _ in rows[:100])
    # A model that does not adapt is worse after the abrupt drift than before it.
    model, mae = preprocessing.StandardScaler() | linear_model.LinearRegression(), [metrics.MAE(), metrics.MAE()]
    for i, (x, y, _) in enumerate(load("friedman-abrupt").rows()):
        if i >= 5_000:
            mae[i >= 10_000].update(float(y), model.predict_one(x))
        if i < 10_000:
            model.learn_one(x, float(y))
    assert mae[1].get() > 1.5 * mae[0].get()


def test_csv_gz_with_numeric_labels_gives_integer_label_text(tmp_path):
    path = tmp_path / "d.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("a,y\n1,1.0\n2,0\n")
    assert [r[1] for r in load(f"csv:{path}", target="y").rows()] == ["1", "0"]


@pytest.mark.parametrize("spec, kwargs, message", [
    ("nope", {}, "unknown dataset 'nope'"),
    ("csv:/no/such.csv", {"target": "y"}, "no such file"),
    ("csv:{path}", {}, "needs --target"),
    ("csv:{path}", {"target": "label"}, "--target column 'label' is not in the header"),
    ("csv:{path}", {"target": "y", "entity": "who"}, "--entity column 'who'"),
])
def test_dataset_mistakes_are_named_before_anything_is_published(tmp_path, spec, kwargs, message):
    path = tmp_path / "d.csv"
    path.write_text("a,y\n1,0\n")
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace("'", "'")):
        load(spec.format(path=path), **kwargs)


def test_csv_row_without_label_is_a_clear_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,y\n1,0\n2,\n")
    with pytest.raises(DatasetError, match=r"d.csv:3: no label in column 'y'"):
        list(load(f"csv:{path}", target="y").rows())


def test_label_of_event_i_follows_event_i_plus_delay_and_sorts_between_it_and_the_next():
    order = list(schedule(5, 2))
    assert order.count(("event", 0)) == 1 and len(order) == 10
    for i in range(5):
        label_at = order.index(("label", i))
        if i + 2 < 5:
            assert order[label_at - 1] == ("event", i + 2)
        assert event_ts(i + 2) < label_ts(i, 2) < event_ts(i + 3)
    assert label_ts(0, 0) == event_ts(0) + LABEL_EPSILON_S
    assert order[-3:] == [("event", 4), ("label", 2), ("label", 3)] or order[-2:] == [("label", 3), ("label", 4)]
    assert list(schedule(2, 0)) == [("event", 0), ("label", 0), ("event", 1), ("label", 1)]


def _outcome(position, y_true, y_pred, event_id=None):
    return {"event_id": event_id or f"e{position}", "position": position, "y_true": y_true, "y_pred": y_pred,
            "proba": {y_true: 0.8} if y_pred == y_true else {y_true: 0.2}, "model_version": 1}


def test_report_counts_windows_and_shifts_positions_to_this_replay():
    # The learner had learned 500 labels before this replay: its positions start at 500.
    outcomes = [_outcome(500 + i, "1", "1" if i % 4 else "0") for i in range(2500)]
    outcomes.append(_outcome(9999, "1", "1", event_id="e500"))  # a duplicate after a restart
    report = build_report(
        {"dataset": "x", "events_sent": 2500, "events_valid": 2500, "labels_sent": 2500, "label_delay": 3,
         "model_spec": "preprocessing.StandardScaler() | linear_model.LogisticRegression()",
         "t_first_published": 100.0, "t_last_learned": 110.0, "drift_positions": [1000]},
        outcomes,
        drift=[{"position": 1700, "kind": "concept", "detector": "ADWIN", "level": "drift"},
               {"position": 1600, "kind": "concept", "detector": "ADWIN", "level": "warning"}],
        swaps=[{"position": 2100, "from_version": 1, "to_version": 2, "reason": "promotion"}],
    )
    assert set(REPORT_KEYS) <= set(report)
    assert report["model"] == "StandardScaler | LogisticRegression"
    assert report["examples_learned"] == 2500 and report["outcome_duplicates"] == 1
    assert report["prequential"]["accuracy"] == pytest.approx(0.75)
    assert [w["end"] for w in report["prequential"]["windows"]] == [1000, 2000, 2500]
    assert all(w["accuracy"] == pytest.approx(0.75) for w in report["prequential"]["windows"])
    assert report["drift_events"][0]["position"] == 1200 and report["drift_warnings"][0]["position"] == 1100
    assert report["model_swaps"] == [{"position": 1600, "from_version": 1, "to_version": 2, "reason": "promotion"}]
    assert report["wall_s"] == 10.0 and report["throughput_events_per_s"] == 250.0
    assert report["known_drift_positions"] == [1000]
    json.dumps(report)  # serialisable as it is


def test_prediction_missing_before_the_first_label_counts_as_wrong():
    pq = prequential([_outcome(0, "1", None), _outcome(1, "1", "1")])
    assert pq["accuracy"] == 0.5


def test_short_model_names_keep_arguments():
    assert short_model_name("tree.HoeffdingTreeClassifier(grace_period=50)") == "HoeffdingTreeClassifier(grace_period=50)"
    assert short_model_name("forest.ARFClassifier()") == "ARFClassifier"


def test_plot_writes_a_png_with_drift_and_swaps(tmp_path):
    outcomes = [_outcome(i, "1", "1" if i < 1500 else "0") for i in range(3000)]
    report = build_report({"dataset": "x", "model_spec": "m.M()", "t_first_published": 0.0, "t_last_learned": 1.0,
                           "drift_positions": [1500], "drift_width": 0}, outcomes,
                          drift=[{"position": 1600, "kind": "concept", "detector": "ADWIN", "level": "drift"}],
                          swaps=[{"position": 2000, "from_version": 1, "to_version": 2}])
    path = plot_report(report, tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def test_the_replay_waits_for_a_broker_that_is_away_instead_of_giving_up_at_once():
    """wait_delivered keeps flushing while nothing is acknowledged (a broker outage), until Kafka
    takes the messages or its deadline passes; it reports what is still held."""
    import time

    from driftline.infra import stack
    from driftline.replay.publish import wait_delivered
    from driftline.shared import kafka
    from driftline.shared.settings import Settings

    producer = kafka.producer(Settings(kafka_bootstrap=f"127.0.0.1:{stack.free_port()}"))  # nothing there
    kafka.produce(producer, "nowhere", b"x")
    started = time.monotonic()
    assert wait_delivered(producer, timeout_s=2.5) == 1
    assert 2.5 <= time.monotonic() - started < 6
    producer.purge()


# -- replay.order: the pipeline held to the order Kafka received the stream in ---------------------
def _in_schedule(n: int, delay: int) -> tuple[list, dict]:
    """Acks in the schedule's order, and the outcomes of a pipeline that learned in it."""
    acks = list(schedule(n, delay))
    outcomes = {j: {"known": max(0, j - delay), "position": j} for j in range(n)}
    return acks, outcomes


def test_a_stream_kafka_took_in_order_and_learned_in_order_is_the_schedule():
    acks, outcomes = _in_schedule(50, 3)
    result = order.check(outcomes, acks, 50, 3)
    assert result.broken == [] and result.late_in_kafka == [] and result.learned_late == []
    assert result.learned_before == [max(0, j - 3) for j in range(50)] and result.by_position == list(range(50))


def test_a_label_kafka_took_after_later_events_may_be_learned_after_them_and_is_counted_late():
    acks, outcomes = _in_schedule(20, 2)
    acks.remove(("label", 5))
    acks.insert(acks.index(("event", 10)) + 1, ("label", 5))  # sent after event 7, reached Kafka after event 10
    # Labels 6 and 7 came in time and were learned before it: events 8, 9, 10 scored without label 5.
    for row, position in ((6, 5), (7, 6), (5, 7)):
        outcomes[row]["position"] = position
    for j, known in ((8, 5), (9, 6), (10, 7)):
        outcomes[j]["known"] = known
    result = order.check(outcomes, acks, 20, 2)
    assert result.broken == [] and result.late_in_kafka == [5] and result.learned_late == [5]
    assert result.by_position[:9] == [0, 1, 2, 3, 4, 6, 7, 5, 8]
    outcomes[11]["known"] = 7  # Kafka had labels 5 and 8 before event 11: an order-keeping pipeline learns them first
    assert order.check(outcomes, acks, 20, 2).broken == [(11, "scored without label 5, which Kafka had before it")]


def test_a_label_known_too_early_and_an_event_scored_out_of_its_order_are_broken():
    acks, outcomes = _in_schedule(20, 2)
    outcomes[6]["known"] = 5  # label 4 follows event 6: leakage
    assert order.check(outcomes, acks, 20, 2).broken == [(6, "scored knowing label 4, not older than it (Kafka had the event first)")]
    acks, outcomes = _in_schedule(20, 2)
    outcomes[9]["known"] = 6  # event 8 already knew 6 labels, so event 9 was scored before it
    outcomes[8]["known"] = 7
    assert [j for j, _ in order.check(outcomes, acks, 20, 2).broken] == [8, 9]


def test_labels_learned_in_another_order_than_their_times_are_late():
    acks, outcomes = _in_schedule(10, 0)
    outcomes[3]["position"], outcomes[4]["position"] = 4, 3  # label 4 learned before label 3
    result = order.check(outcomes, acks, 10, 0)
    assert result.learned_late == [3] and result.by_position[3:5] == [4, 3]


def test_hat_reference_runs_its_seeds_side_by_side_and_gives_the_sequential_answer(monkeypatch):
    """`bench drift` and the drift end-to-end tests compare with the mean of HAT's seeds: run in
    processes of their own on several cores, the same per-example shares as one after another."""
    from driftline.bench import drift

    monkeypatch.setattr(drift.os, "cpu_count", lambda: 2)
    side_by_side = drift.hat_hits("sea-abrupt", limit=300)
    monkeypatch.setattr(drift.os, "cpu_count", lambda: 1)
    one_by_one = drift.hat_hits("sea-abrupt", limit=300)
    assert side_by_side == one_by_one and len(one_by_one) == 300
    assert any(0 < share < 1 for share in one_by_one)  # the seeds do differ: a mean, not one run
