"""Exact learning order under a backlog: a replay published at full speed (far faster than the
pipeline drains it) gives, event by event, the predictions of river's own prequential loop.

The replay's label delay N publishes the label of event i right after event i+N, with a ts just
after it: the learner learns it after scoring event i+N, before event i+N+1. That is river's
`progressive_val_score(..., delay=N + 1)` (river reveals an answer *before* the question of the
moment it falls due; its delays 0 and 1 are the same loop), which `in_process` below also checks.

Every outcome carries `known`, the labels the learner had learned when it scored that event; by
stream order that is exactly max(0, j - N) for event j: fewer would be a label learned late,
more a label known too early (leakage). The one exception is a label that reached Kafka after a
later event (the replay's producer batches each partition apart; on loaded cores one batch can
leave tens of milliseconds after another): no service can wait for what is not in Kafka yet, so
it may be learned after the events that followed it. The replay records the order in which Kafka
acknowledged its records, and `replay.order.check` holds the pipeline to that order: every label
Kafka had before an event is learned before it is scored, and river's predictions are rebuilt in
the order the learner did learn.

Three live-rate replays kill ingestion, features or the learner mid-stream (kill -9, then a
restart) and are held to the same rule: what a restarted service reads or publishes again must
change no prediction and double none.

The flow-control bounds are set low so that the partitions running ahead really are paused.
`make test` replays 20,000 rows (4 entities, so 4 features partitions); the 200,000-row run
is marked `slow` and runs only with SLOW_TESTS=1 (several minutes at today's throughput).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import warnings

import pytest
from confluent_kafka import TopicPartition

from driftline.replay.datasets import Dataset, _numeric, label_text
from driftline.replay import order as learning_order
from driftline.replay.publish import labels_before
from driftline.shared import kafka
from driftline.shared.topics import Topics
from conftest import make_settings
from learner_harness import read_all, wait_for
from pipeline import PIPELINE, as_learned, metric, replay_report, start_pipeline

pytestmark = pytest.mark.e2e

LOGREG = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"
TREE = "tree.HoeffdingTreeClassifier()"
BOUNDS = {"DRIFTLINE_LEARNER__MAX_HELD_EVENTS": "1000", "DRIFTLINE_LEARNER__MAX_WAITING_LABELS": "1000",
          "DRIFTLINE_LEARNER__LABEL_IDLE_S": "30"}


def agrawal(n: int, entities: int = 4) -> Dataset:
    """river's Agrawal (function 2: a tree fits it), four entities so that events spread over partitions."""
    from river.datasets import synth

    def rows():
        for i, (x, y) in enumerate(itertools.islice(synth.Agrawal(classification_function=2, seed=7), n)):
            yield _numeric(x), label_text(y), f"m{i % entities}"

    return Dataset(f"agrawal-{n}", rows, n, description=f"river Agrawal function 2, {entities} entities")


def in_process(rows, spec: str, delay: int) -> list[str | None]:
    """river in-process with the replay's rule: label i is learned after event i + delay is scored."""
    from river import evaluate, metrics

    from driftline.learner.labels import to_river
    from driftline.learner.spec import parse_model

    n = len(rows)
    preds = as_learned(rows, spec, learning_order.Order(learned_before=[labels_before(j, delay) for j in range(n)],
                                                         by_position=list(range(n))))
    # The same loop is river's own progressive validation at delay + 1 (see the module doc).
    river = evaluate.progressive_val_score(((x, to_river(y)) for x, y, _ in rows), parse_model(spec),
                                           metrics.Accuracy(), delay=delay + 1).get()
    accuracy = sum(p == y for p, (_, y, _) in zip(preds, rows)) / len(rows)
    assert accuracy == pytest.approx(river, abs=1e-3)
    return preds


def check_exact_order(settings, run_service, spec: str, n: int, delay: int, entities: int = 4, rate: float = 0.0,
                      meanwhile=None, **env) -> dict:
    """`meanwhile(procs)`, if given, runs beside the replay (a crash, say)."""
    procs = start_pipeline(run_service, model=spec, features="raw", **{**BOUNDS, **env})
    dataset = agrawal(n, entities)
    beside = threading.Thread(target=meanwhile, args=(procs,), daemon=True) if meanwhile else None
    if beside is not None:
        beside.start()
    report = replay_report(settings, dataset, label_delay=delay, rate=rate, model=spec, features="raw",
                           stall_timeout_s=120)
    if beside is not None:
        beside.join(60)
    rows = list(dataset.rows())
    expected = in_process(rows, spec, delay)
    assert report["checks"]["features_match"] is True
    assert report["examples_learned"] == report["labels_sent"] == n and report["labels_dlq"] == 0
    outcomes = {int(o["event_id"].rsplit("-", 1)[1]): o for o in report["_outcomes"]}
    assert len(outcomes) == n
    order = learning_order.check(outcomes, report["_acks"], n, delay)
    assert not order.broken, f"{len(order.broken)} events scored out of Kafka's order: " + ", ".join(
        f"event {j}: {why}" for j, why in order.broken[:5]) + "".join(
        f"\n--- {name}'s log, last lines ---\n{proc.log_tail(60)}" for name, proc in procs.items())
    if order.learned_before != [labels_before(j, delay) for j in range(n)] or order.by_position != list(range(n)):
        # Only labels that reached Kafka after a later event (checked above): river in that order.
        warnings.warn(f"{len(order.late_in_kafka)} labels reached Kafka after a later event "
                      f"(first {order.late_in_kafka[:3]}); {len(order.learned_late)} of them were learned after it",
                      stacklevel=2)
        expected = as_learned(rows, spec, order)
    differ = [j for j in range(n) if outcomes[j]["y_pred"] != expected[j]]
    assert not differ, f"{len(differ)} of {n} predictions differ from river in-process, first {differ[:5]}"
    window = settings.learner.window
    got = [w["accuracy"] for w in report["prequential"]["windows"]]
    want = [sum(expected[j] == rows[j][1] for j in range(s, min(s + window, n))) / min(window, n - s)
            for s in range(0, n, window)]
    assert got == pytest.approx(want, abs=1e-9)
    learner = procs["learner"]
    assert metric(learner, "driftline_labels_out_of_order_total") == len(order.learned_late)
    assert metric(learner, "driftline_scored_ahead_of_labels_total") == 0
    report["_services"] = procs  # still running: a test may read their metrics
    return report


@pytest.mark.parametrize("spec,delay", [(TREE, 0), (LOGREG, 100)], ids=["tree-delay0", "logreg-delay100"])
def test_full_speed_replay_predicts_exactly_as_river_in_process(settings, run_service, spec, delay):
    check_exact_order(settings, run_service, spec, 20_000, delay)


def test_batched_fetches_at_a_live_rate_predict_exactly_as_river_in_process(settings, run_service):
    # kafka_fetch_batch_ms: the hot path's fetches wait for 64 KiB or 10 ms; live traffic then comes
    # in larger batches, and nothing about the order may change.
    check_exact_order(settings, run_service, LOGREG, 3_000, 100, rate=1_000, DRIFTLINE_KAFKA_FETCH_BATCH_MS="10")


def kill_9_mid_stream(name: str, counter: str, **labels):
    """A `meanwhile` for check_exact_order: kill -9 of service `name` once its `counter` (with
    these labels) reaches 1,000, a third of the stream, then its restart."""
    def crash(procs) -> None:
        victim = procs[name]
        wait_for(lambda: metric(victim, counter, **labels) >= 1_000, what=f"{name} a third through the stream")
        victim.kill9()
        victim.restart()
    return crash


def test_vectors_a_restarted_features_service_publishes_again_are_scored_once(settings, run_service):
    """kill -9 of the features service mid-stream, with a commit due only every 2 s: after its
    restart it reads again what it had published and not committed, and publishes those vectors
    again. The learner scores each event once (one champion prediction each, the first copy's),
    and the order holds as if nothing had happened."""
    crash = kill_9_mid_stream("features", "driftline_messages_out_total", topic="features")
    report = check_exact_order(settings, run_service, LOGREG, 3_000, 100, rate=1_000, meanwhile=crash,
                               DRIFTLINE_FEATURES__COMMIT_INTERVAL_S="2")
    copies = metric(report["_services"]["learner"], "driftline_duplicates_total", topic="features")
    print("copies dropped:", copies)
    assert copies > 0, "no vector came twice: the crash came after the last commit"
    predictions = read_all(settings, Topics(settings.namespace).predictions, "Prediction",
                           until=lambda got: sum(p["role"] == "champion" for p in got) >= 3_000)
    scored = [p["event_id"] for p in predictions if p["role"] == "champion"]
    assert len(scored) == len(set(scored)) == 3_000, f"{len(scored) - len(set(scored))} events scored twice"


def test_a_restarted_ingestion_service_reads_again_and_changes_nothing(settings, run_service):
    """kill -9 of ingestion mid-stream, with a commit due only every 2 s: after its restart it
    reads again events and labels it had published and not committed, and drops them as
    duplicates (their first-seen claims were marked as Kafka acknowledged them). Nothing is
    published twice that the order would see: it is exactly river's."""
    crash = kill_9_mid_stream("ingestion", "driftline_messages_out_total", topic="events.valid")
    report = check_exact_order(settings, run_service, LOGREG, 3_000, 100, rate=1_000, meanwhile=crash,
                               DRIFTLINE_INGESTION__COMMIT_INTERVAL_S="2")
    copies = metric(report["_services"]["ingestion"], "driftline_duplicates_total")
    print("copies dropped:", copies)
    assert copies > 0, \
        "nothing was read again: the crash came after the last commit"


def test_a_learner_killed_mid_stream_and_restarted_predicts_exactly_as_river_in_process(settings, run_service):
    """kill -9 of the learner mid-stream: its successor takes the checkpoint's positions, re-learns
    the labels learned since without publishing them again, keeps the predictions stored for the
    events scored since, and the order is exactly river's."""
    crash = kill_9_mid_stream("learner", "driftline_examples_learned_total", role="champion")
    check_exact_order(settings, run_service, LOGREG, 3_000, 100, rate=1_000, meanwhile=crash)


def test_streams_of_two_partitions_at_a_live_rate_predict_exactly_as_river_in_process(infra, tmp_path, run_service):
    # kafka_stream_partitions: a single machine's stack may run its streams on fewer partitions
    # (the learner then waits for fewer label partitions); the order must not change.
    two = make_settings(infra, tmp_path, kafka_stream_partitions=2)
    kafka.ensure_topics(two)
    assert len(kafka.partitions_of(two, Topics(two.namespace).labels_valid)) == 2
    check_exact_order(two, run_service, LOGREG, 3_000, 100, rate=1_000, settings_override=two)


def test_empty_partitions_hold_nothing_back_once_the_services_before_say_nothing_older_is_coming(settings, run_service):
    """One entity: its events take one features partition, and the other five stay empty. An empty
    partition might still get an older event, so without word from upstream the learner would
    wait label_idle_s (here 300 s) before counting it idle. Ingestion and features commit the
    event time they have got to (offset-commit metadata); from that the learner knows nothing
    older is coming, and goes on at once, in exact order."""
    idle_s = 300
    report = check_exact_order(settings, run_service, LOGREG, 3_000, 0, entities=1,
                               DRIFTLINE_LEARNER__LABEL_IDLE_S=str(idle_s))
    assert report["wall_s"] < idle_s / 3, "the learner waited for the empty partitions to go idle"
    # The watermarks themselves: each group's commit on the partition it read carries the event
    # time of the last event there (the replay's ts are START_TS + i).
    topics = Topics(settings.namespace)
    last_ts = max(o["ts"] for o in report["_outcomes"])
    for group, topic in (("ingestion", topics.events), ("features", topics.events_valid)):
        reader = kafka.consumer(settings, topics.group(group))
        try:
            committed = reader.committed([TopicPartition(topic, tp.partition)
                                          for tp in kafka.partitions_of(settings, topic)], timeout=10)
        finally:
            reader.close()
        times = [kafka.event_time_of(tp.metadata) for tp in committed if tp.offset > 0]
        assert times == [last_ts], (group, [(tp.partition, tp.offset, tp.metadata) for tp in committed])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SLOW_TESTS"), reason="200,000 rows: set SLOW_TESTS=1")
@pytest.mark.parametrize("spec,delay", [(TREE, 0), (LOGREG, 100)], ids=["tree-delay0", "logreg-delay100"])
def test_200k_rows_full_speed_predict_exactly_as_river_in_process(settings, run_service, spec, delay):
    check_exact_order(settings, run_service, spec, 200_000, delay)
