"""The learner's rules without Kafka or Redis: ordering, the delayed join, the roles and their
contest, the records it decodes and the checkpoint it keeps. Each test drives one pure part
with a list of events and labels, as river's progressive validation would."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from driftline.features.store import Snapshot
from driftline.learner.champion import Contest, Roles, Slot, predict, warm_start
from driftline.learner.checkpoint import LearnerState, Replay, load_checkpoint
from driftline.learner.examples import ExampleBuffer
from driftline.learner.join import DelayedJoin
from driftline.learner.ordering import HeldEvents, LabelWatermark
from driftline.learner.prequential import Prequential
from driftline.learner.records import Control, Event, Label, decode
from driftline.learner.spec import parse_model
from driftline.shared.codec import DecodeError, get_codec
from driftline.shared.deadletter import REASONS, dead_letter
from driftline.shared.keys import Keys
from driftline.shared.registry import TamperedArtifact, dumps_signed

NOW = 1_000.0  # wall time in these tests


def event(i: int, ts: float | None = None, seen: float = NOW, partition: int = 0) -> Event:
    return Event(f"e{i}", float(i if ts is None else ts), {"event_id": f"e{i}", "entity_id": "m", "ts": i,
                                                          "features": {"a": float(i)}}, "features", partition, i, seen)


def label(i: int, ts: float | None = None, seen: float = NOW, partition: int = 0, y: str = "1") -> Label:
    return Label(f"e{i}", y, float(i + 0.5 if ts is None else ts), seen, b"raw", f"e{i}".encode(), partition, i)


# -- ordering --------------------------------------------------------------------------------------
def test_the_label_watermark_is_the_slowest_partition_and_an_idle_finished_one_does_not_hold_back():
    marks = LabelWatermark(idle_s=3.0)
    marks.saw_features(NOW)
    marks.saw_labels([(0, 50.0), (1, 20.0)], NOW)
    assert marks.mark([(0, False), (1, False)], NOW) == 20.0
    assert marks.mark([(0, False), (1, True)], NOW + 1) == 20.0  # at its end, but not idle yet
    assert marks.mark([(0, False), (1, True)], NOW + 3) == 50.0  # at its end and idle: done
    assert marks.mark([(0, True), (1, True)], NOW + 3) == float("inf")
    assert marks.mark([(0, False), (2, False)], NOW) == float("-inf")  # a partition never read holds all


def test_a_partition_empty_when_the_stream_starts_holds_events_back_for_the_idle_time():
    # At a replay's start the features service may write one entity's partition before another's:
    # the one still empty (at its end, never read) must not let the other's later events through.
    marks = LabelWatermark(idle_s=3.0)
    marks.saw_features(NOW)
    marks.saw_labels([(3, 50.0)], NOW)
    assert marks.mark([(0, True), (3, False)], NOW + 1) == float("-inf")
    assert marks.mark([(0, True), (3, False)], NOW + 3) == 50.0


def test_a_quiet_partition_at_its_end_is_not_idle_while_the_services_before_it_have_a_backlog():
    # Behind a backlog, the service upstream may starve one partition for longer than idle_s:
    # that partition lags, it is not idle.
    marks = LabelWatermark(idle_s=3.0)
    marks.saw_features(NOW)
    marks.saw_labels([(0, 50.0), (1, 20.0)], NOW)
    assert marks.mark([(0, False), (1, True)], NOW + 10, drained=lambda p: False) == 20.0
    assert marks.mark([(0, False), (1, True)], NOW + 10, drained=lambda p: True) == 50.0
    assert marks.mark([(0, False), (1, True), (2, True)], NOW + 10, drained=lambda p: False) == -float("inf")
    features = LabelWatermark(idle_s=3.0, empty_is_idle=True)  # no entity may ever hash to features/2
    features.saw_features(NOW)
    features.saw_labels([(0, 50.0), (1, 20.0)], NOW)
    assert features.mark([(0, False), (1, True), (2, True)], NOW + 10, drained=lambda p: False) == 20.0


def test_features_coming_back_after_a_quiet_spell_give_labels_time_again():
    marks = LabelWatermark(idle_s=3.0)
    marks.saw_labels([(0, 5.0)], NOW)
    marks.saw_features(NOW + 10)  # a new stream starts: its labels may still be on their way
    assert marks.mark([(0, True)], NOW + 11) == 5.0
    assert marks.mark([(0, True)], NOW + 13) == float("inf")


def test_held_events_are_released_in_ts_order_up_to_the_watermark_and_never_before_however_many_or_old():
    held = HeldEvents()
    held.add([event(5), event(1), event(3), event(9, seen=NOW - 10_000)])
    assert [e.event_id for e in held.release(3.0)] == ["e1", "e3"]
    assert [e.event_id for e in held.release(3.0)] == []  # e9 waited hours: it still waits
    assert held.ids() == {"e5", "e9"}
    held.add([event(i) for i in range(10, 100_010)])
    assert held.release(4.9) == [] and len(held) == 100_002  # memory is bounded by pausing, not by release
    assert [e.event_id for e in held.release(float("inf"))][:3] == ["e5", "e9", "e10"]


def test_the_features_mark_is_the_slowest_partition_still_being_read():
    from driftline.learner.ordering import features_mark
    assert features_mark({0: 5.0, 1: 9.0}, [(0, False), (1, False)]) == 5.0
    assert features_mark({0: 5.0, 1: 9.0}, [(0, True), (1, False)]) == 9.0  # read to its end: holds nothing
    assert features_mark({}, [(0, True), (1, True)]) == float("inf")
    assert features_mark({0: 5.0}, [(0, False), (1, False)]) == float("-inf")  # not read yet: holds all


def test_labels_held_back_alone_ask_the_services_before_us_once_the_oldest_has_waited():
    # The HTTP-only loop: no events, a label every few ms over every labels.valid partition. The
    # oldest label beyond the watermark decides; the newest is never old in a steady stream.
    from driftline.learner.worker import LABEL_FLOOR_CHECK_S, LABELS_ALONE_CHECK_S, LearnerWorker

    worker = LearnerWorker.__new__(LearnerWorker)
    worker.held = HeldEvents()
    worker.join = DelayedJoin(hold_s=0.0, patience_s=10.0, grace_s=30.0)
    worker.join.add([label(1, seen=NOW), label(2, seen=NOW + 0.02), label(3, seen=NOW + 0.04)])
    later = NOW + LABELS_ALONE_CHECK_S + 0.001
    assert worker.waits_on_upstream(mark=float("-inf"), label_mark=1.0, now=later)  # e1 (ts 1.5) waited
    assert not worker.waits_on_upstream(mark=float("-inf"), label_mark=1.0, now=later - 0.002)
    assert not worker.waits_on_upstream(mark=float("-inf"), label_mark=1.6, now=later)  # e2 has not waited
    assert not worker.waits_on_upstream(mark=float("-inf"), label_mark=3.5, now=NOW + 60)  # none beyond
    # Events flowing (scored just now, none held): later labels soon come; the question waits longer.
    worker.join.last_feature_at = time.time()
    assert not worker.waits_on_upstream(mark=float("-inf"), label_mark=1.0, now=later)
    assert worker.waits_on_upstream(mark=float("-inf"), label_mark=1.0, now=NOW + LABEL_FLOOR_CHECK_S + 0.001)


def test_labels_alone_beyond_the_watermark_bring_the_loop_back_as_soon_as_they_may_ask_again():
    # The HTTP-only loop: a label waits for the answer, not for a whole poll (50 ms) or a question
    # paced for held events (100 ms); a question that lets nothing go is asked less often. While
    # events flow, the pace stays theirs.
    from driftline.learner.worker import FLOOR_CHECK_S, LABELS_ALONE_CHECK_S, POLL_TIMEOUT_S, LearnerWorker

    worker = LearnerWorker.__new__(LearnerWorker)
    worker.held = HeldEvents()
    worker.join = DelayedJoin(hold_s=0.0, patience_s=10.0, grace_s=30.0)
    worker.label_floor_check_s = LABELS_ALONE_CHECK_S
    assert worker.poll_timeout_s == POLL_TIMEOUT_S  # no label waits
    worker.join.add([label(1, seen=NOW)])
    worker.join.label_mark = 1.0  # e1 (ts 1.5) is beyond it
    assert worker.poll_timeout_s == worker.floor_check_s == LABELS_ALONE_CHECK_S < POLL_TIMEOUT_S
    worker.labels_asked(moved=False)
    assert worker.poll_timeout_s == worker.floor_check_s == 2 * LABELS_ALONE_CHECK_S
    worker.join.label_mark = 2.0  # e1 is within it: it waits for its event, not for the labels
    assert worker.poll_timeout_s == POLL_TIMEOUT_S
    worker.join.label_mark = 1.0
    worker.join.last_feature_at = time.time()  # events scored just now: they flow, labels are not alone
    assert worker.poll_timeout_s == POLL_TIMEOUT_S and worker.floor_check_s == FLOOR_CHECK_S
    worker.join.last_feature_at = 0.0
    worker.held.add([event(1)])  # events held: the pace of held events
    assert worker.poll_timeout_s == POLL_TIMEOUT_S and worker.floor_check_s == FLOOR_CHECK_S


def test_flow_control_pauses_the_side_that_runs_ahead_and_never_the_partition_that_sets_the_mark():
    from driftline.learner.ordering import FlowControl
    flow = FlowControl(max_held=100, max_waiting=100)
    features, labels = {0: 50.0, 1: 80.0}, {0: 20.0, 1: 30.0}
    assert flow.decide(10, 10, features, labels, mark=20.0) == set()  # under both bounds: read everything
    # Labels lag: events pile up; the features partitions ahead of the mark wait, labels are read.
    assert flow.decide(100, 10, features, labels, mark=20.0) == {("features", 0), ("features", 1)}
    assert flow.decide(60, 10, features, labels, mark=20.0) == {("features", 0), ("features", 1)}  # hysteresis
    assert flow.decide(49, 10, features, labels, mark=20.0) == set()
    # Features lag: labels pile up; the labels.valid partitions past the mark wait.
    assert flow.decide(0, 100, {0: 10.0, 1: 12.0}, labels, mark=10.0) == {("labels", 0), ("labels", 1)}
    # Both over their bounds: whatever sets the mark is still read.
    for mark_features, mark_labels in ((10.0, 30.0), (50.0, 20.0)):
        features, labels = {0: mark_features, 1: 90.0}, {0: mark_labels, 1: 95.0}
        mark = min(min(features.values()), min(labels.values()))
        paused = flow.decide(1000, 1000, features, labels, mark)
        assert ("features", 0) not in paused or ("labels", 0) not in paused
        assert ("features", 1) in paused and ("labels", 1) in paused


# -- the delayed join ------------------------------------------------------------------------------
def new_join(**kw) -> DelayedJoin:
    return DelayedJoin(**{"hold_s": 0.2, "patience_s": 10.0, "grace_s": 30.0, **kw})


def test_labels_are_learned_before_the_first_later_event_and_after_the_earlier_ones():
    join = new_join()
    join.add([label(2, ts=2.5), label(0, ts=0.5)])
    events = [event(1), event(2), event(3)]
    due = join.due(events, held=set(), now=NOW)
    plan = [(type(s).__name__, s.event_id) for s in join.plan(events, due)]
    assert plan == [("Label", "e0"), ("Event", "e1"), ("Event", "e2"), ("Label", "e2"), ("Event", "e3")]


def test_a_label_as_old_as_its_event_is_learned_right_after_it_as_in_rivers_loop():
    # Delay 0 with the label's ts equal to its event's (a faust app sends both with one clock):
    # released together, each label must come right after its own event, not wait for the walk's end.
    join = new_join()
    join.add([label(i, ts=float(i)) for i in (3, 1, 2)] + [label(0, ts=1.0)])  # e0's label: a clock behind
    events = [event(1), event(2), event(3)]
    due = join.due(events, held=set(), now=NOW)
    plan = [(type(s).__name__, s.event_id) for s in join.plan(events, due)]
    assert plan == [("Label", "e0"), ("Event", "e1"), ("Label", "e1"), ("Event", "e2"), ("Label", "e2"),
                    ("Event", "e3"), ("Label", "e3")]
    # A label older than its own event still never comes before it.
    join = new_join()
    join.add([label(2, ts=0.5)])
    events = [event(1), event(2)]
    plan = [(type(s).__name__, s.event_id) for s in join.plan(events, join.due(events, set(), NOW))]
    assert plan == [("Event", "e1"), ("Event", "e2"), ("Label", "e2")]


def test_the_rules_skip_their_scans_only_when_no_waiting_label_could_pass_them():
    """`waiting_since` lets due() and expire() skip a scan of every waiting label while none has
    waited long enough: over random walks they decide exactly as with the scans always made."""
    import random

    rng = random.Random(7)
    for _ in range(40):
        fast, slow = new_join(hold_s=0.5, patience_s=2.0, grace_s=5.0), new_join(hold_s=0.5, patience_s=2.0, grace_s=5.0)
        now, i = NOW, 0
        for _ in range(60):
            now += rng.choice((0.01, 0.3, 1.0, 3.0))
            fresh = [label(i + k, ts=rng.uniform(0, 100), seen=now) for k in range(rng.randint(0, 4))]
            i += len(fresh)
            held = {f"e{rng.randrange(max(i, 1))}"} if rng.random() < 0.3 else set()
            events = sorted((event(1000 + k, ts=rng.uniform(0, 100)) for k in range(rng.randint(0, 3))),
                            key=lambda e: e.ts)
            current = rng.random() < 0.8
            for join in (fast, slow):
                join.add(fresh)
                join.current = current
            slow.waiting_since = float("-inf")  # always scans
            due_fast, due_slow = fast.due(events, held, now), slow.due(events, held, now)
            assert [lb.event_id for lb in due_fast] == [lb.event_id for lb in due_slow]
            learned = {id(lb) for lb in due_fast if rng.random() < 0.7}
            slow_learned = {id(b) for a, b in zip(due_fast, due_slow) if id(a) in learned}
            fast.settle(due_fast, learned, (), now)
            slow.settle(due_slow, slow_learned, (), now)
            slow.waiting_since = float("-inf")
            assert [lb.event_id for lb in fast.expire(now, held)] == [lb.event_id for lb in slow.expire(now, held)]
            assert [lb.event_id for lb in fast.waiting] == [lb.event_id for lb in slow.waiting]
            assert fast.waiting_since <= min((lb.seen for lb in fast.waiting), default=float("inf"))


def test_a_label_ahead_of_every_event_waits_until_the_stream_is_idle_for_the_hold():
    join = new_join()
    join.add([label(9, ts=9.5)])
    assert join.due([event(1)], set(), NOW) == []
    assert join.due([], set(), NOW + 0.1) == []
    assert [lb.event_id for lb in join.due([], set(), NOW + 0.3)] == ["e9"]


def test_under_a_backlog_no_label_is_released_early_nor_expired():
    join = new_join(grace_s=1.0)
    join.current = False  # something is still on its way through ingestion or features
    join.add([label(9, ts=9.5, seen=NOW - 100)])
    join.scored(event(8), Snapshot({"features": {}}, {"champion": {}}))
    join.last_feature_at = NOW - 100  # features quiet: a stall, not the end, while something is on its way
    assert join.due([], set(), NOW) == []
    join.clock = 200.0  # event time far past the label (another partition ran ahead): still not given up
    assert join.expire(NOW, held=set()) == []
    join.current = True
    assert [lb.event_id for lb in join.expire(NOW, held=set())] == ["e9"]


def test_a_label_ahead_of_every_event_is_not_released_early_while_older_events_are_held():
    join = new_join()
    join.add([label(9, ts=9.5, seen=NOW - 1)])
    assert join.due([], held={"e5"}, now=NOW) == []  # e5 (ts 5) must be scored before label 9 is learned
    assert [lb.event_id for lb in join.due([], held=set(), now=NOW)] == ["e9"]


def test_a_label_whose_event_is_held_is_never_due_nor_expired():
    join = new_join(grace_s=1.0)
    join.add([label(4, ts=4.5, seen=NOW - 100)])
    assert join.due([event(5)], held={"e4"}, now=NOW) == []
    assert join.expire(NOW + 100, held={"e4"}) == [] and len(join.waiting) == 1


def test_overdue_needs_the_grace_and_a_features_stream_that_went_quiet_or_moved_past_the_label():
    join = new_join(grace_s=30.0)
    lb = label(1, ts=1.5, seen=NOW)
    join.last_feature_at = NOW + 40
    join.clock = 10.0
    assert not join.overdue(lb, NOW + 40)  # waited its grace, but events flow and are not past it
    join.clock = 40.0
    assert join.overdue(lb, NOW + 40)  # event time moved past ts + grace
    join.clock = 10.0
    assert join.overdue(lb, NOW + 70)  # the features stream is quiet for the grace
    join.add([lb])
    assert join.expire(NOW + 70, held=set()) == [lb] and join.waiting == []


def test_a_label_is_ready_once_its_event_is_scored_by_the_champion_or_overdue():
    join = new_join(grace_s=30.0)
    lb = label(1)
    assert join.snapshot_for(lb, {}, NOW) is None
    vector_only = {"e1": Snapshot({"features": {}}, {})}
    assert join.snapshot_for(lb, vector_only, NOW) is None  # not scored yet: wait for it
    assert join.snapshot_for(lb, vector_only, NOW + 31) is not None  # overdue: score it now
    join.scored(event(1), Snapshot({"features": {}}, {"champion": {}}))
    assert join.snapshot_for(lb, {}, NOW) is not None and join.clock == 1.0


def test_a_learned_label_is_forgotten_duplicates_are_known_and_late_ones_flagged():
    join = new_join()
    join.scored(event(1), Snapshot({}, {}))
    assert not join.learn(label(1, ts=5.0)) and "e1" not in join.recent
    assert join.learned_before(label(1))
    assert join.learn(label(2, ts=3.0))  # out of order: after a label of ts 5


def test_a_label_learned_after_a_later_event_was_scored_is_out_of_order_too():
    """No later label learned yet, but an event later than the label scored without it (the label
    reached Kafka after that event): river's loop would have learned it first. A label older than
    its own event, or as old as the newest scored event, is in order."""
    join = new_join()
    join.scored(event(1, ts=1.0), Snapshot({}, {}))
    join.scored(event(2, ts=4.0), Snapshot({}, {}))
    assert join.learn(label(1, ts=2.0), event_ts=1.0)
    join = new_join()
    join.scored(event(1, ts=4.0), Snapshot({}, {}))
    assert not join.learn(label(1, ts=3.0), event_ts=4.0)  # a label clock behind: right after its event
    assert not join.learn(label(2, ts=4.0), event_ts=2.0)  # ties are in order
    assert not join.learn(label(3, ts=6.0))


def test_settle_keeps_the_unlearned_and_does_not_look_up_a_missing_snapshot_again_at_once():
    join = new_join()
    a, b = label(1), label(2)
    join.add([a, b])
    join.settle([a, b], learned={id(a)}, looked_up={"e2"}, now=NOW)
    assert join.waiting == [b] and b.retry_at == NOW + 0.5
    assert join.to_look_up([b], NOW) == [] and join.to_look_up([b], NOW + 1) == [b]


def test_only_the_most_recent_scored_events_are_kept_in_memory():
    join = new_join(recent_max=2)
    for i in range(3):
        join.scored(event(i), Snapshot({}, {}))
    assert list(join.recent) == ["e1", "e2"]


# -- roles and contest -------------------------------------------------------------------------------
def slot(role: str, version: int, spec: str = "dummy.NoChangeClassifier()") -> Slot:
    return Slot(role, version, parse_model(spec), Prequential(10))


def test_roles_score_only_their_own_answers_and_the_champion_answers_late_ones_itself():
    roles = Roles(slot("champion", 1))
    learned = roles.learn({}, "1", {})  # past the grace: no answer stored, the champion answers now
    assert learned.hits == {"champion": False} and [r for r, _ in learned.answers] == ["champion"]
    roles.start(slot("challenger", 2), Contest("margin", 1, 10, 0.0, 100))
    stale = {"champion": {"model_version": 1, "y_pred": "1", "proba": {"1": 1.0}},
             "challenger": {"model_version": 7, "y_pred": "1", "proba": {"1": 1.0}}}
    learned = roles.learn({}, "1", stale)
    assert learned.hits == {"champion": True} and learned.verdict is None  # v7's answer is not v2's
    assert roles.contest.shared == 0 and roles.champion.examples == 2 and roles.challenger.examples == 1


def test_a_challenger_that_wins_the_contest_is_promoted_and_one_that_does_not_is_dropped():
    roles = Roles(slot("champion", 1))
    roles.start(slot("challenger", 2), Contest("margin", promote_after=2, window=2, margin=0.1, max_shadow=3))
    answers = {"champion": {"model_version": 1, "y_pred": "0", "proba": {}},
               "challenger": {"model_version": 2, "y_pred": "1", "proba": {}}}
    assert roles.learn({}, "1", answers).verdict is None
    assert roles.learn({}, "1", answers).verdict == "promote"
    old, new, gone = roles.promote()
    assert (old.version, new.version, new.role, roles.challenger, roles.contest, gone) == (
        1, 2, "champion", None, None, None)

    roles.start(slot("challenger", 3), Contest("margin", promote_after=1, window=5, margin=0.5, max_shadow=1))
    same = {"champion": {"model_version": 2, "y_pred": "1", "proba": {}},
            "challenger": {"model_version": 3, "y_pred": "1", "proba": {}}}
    assert roles.learn({}, "1", same).verdict == "drop"
    assert roles.drop().version == 3 and roles.challenger is None


def test_a_champion_chosen_elsewhere_restarts_the_contest_or_ends_the_challengers_shadowing():
    roles = Roles(slot("champion", 1), slot("challenger", 2), Contest("margin", 1, 10, 0.0, 100, shared=5))
    fresh = Contest("margin", 1, 10, 0.0, 100)
    old = roles.replace_champion(slot("champion", 3), fresh)
    assert old.version == 1 and roles.champion.version == 3 and roles.contest is fresh
    roles.replace_champion(roles.challenger)
    assert roles.champion.version == 2 and roles.champion.role == "champion" and roles.challenger is None


def test_a_warm_start_teaches_the_challenger_and_is_no_evidence_in_its_contest():
    """The warm-start examples are those on which the detector saw the champion fail: judged on
    them a new model looks better than it is, so they teach and do not count."""
    model = parse_model("dummy.NoChangeClassifier()")
    examples = [({}, "1", False, 1), ({}, "0", False, 1), ({}, "1", None, 1), ({}, "1", True, 0)]
    assert warm_start(model, examples) == 4
    assert predict(model, {}) == "1"  # it learned them all, oldest first


def test_a_displaced_champion_shadows_and_comes_back_when_it_does_better():
    contest = lambda: Contest("margin", promote_after=2, window=2, margin=0.1, max_shadow=4)  # noqa: E731
    roles = Roles(slot("champion", 1))
    roles.start(slot("challenger", 2), contest())
    old, new, _ = roles.promote(recall=contest())
    assert (roles.champion, roles.previous, old.role) == (new, old, "previous")
    assert [s.role for s in roles.slots()] == ["champion"]  # the displaced one answers only to its contest
    assert set(roles.score({})) == {"champion", "previous"}
    wrong_then_right = {"champion": {"model_version": 2, "y_pred": "0", "proba": {}},
                        "previous": {"model_version": 1, "y_pred": "1", "proba": {}}}
    assert roles.learn({}, "1", wrong_then_right).recall is None
    assert roles.learn({}, "1", wrong_then_right).recall == "promote"
    gone, back = roles.restore_previous()
    assert (gone.version, back.version, back.role, roles.previous, roles.recall) == (2, 1, "champion", None, None)


def test_a_displaced_champion_that_does_not_do_better_stops_shadowing():
    roles = Roles(slot("champion", 1))
    roles.start(slot("challenger", 2), Contest("margin", 1, 10, 0.0, 100))
    roles.promote(recall=Contest("margin", promote_after=1, window=5, margin=0.5, max_shadow=2))
    same = {"champion": {"model_version": 2, "y_pred": "1", "proba": {}},
            "previous": {"model_version": 1, "y_pred": "1", "proba": {}}}
    assert roles.learn({}, "1", same).recall is None
    assert roles.learn({}, "1", same).recall == "drop"
    assert roles.forget_previous().version == 1 and roles.every_slot() == [roles.champion]


def test_the_model_the_loop_started_from_shadows_for_good_and_comes_back_when_it_wins():
    """"Never worse than not adapting": once displaced, the never retrained model (the baseline)
    shadows every later champion, beside the champion each promotion displaced (`previous`)."""
    contest = lambda: Contest("margin", promote_after=2, window=2, margin=0.1, max_shadow=4)  # noqa: E731
    roles = Roles(slot("champion", 1))
    roles.start(slot("challenger", 2), contest())
    roles.promote(recall=contest(), anchor=contest())
    assert (roles.baseline.version, roles.baseline.role, roles.previous) == (1, "baseline", None)
    roles.start(slot("challenger", 3), contest())
    _, _, gone = roles.promote(recall=contest(), anchor=contest())
    assert gone is None and [(s.role, s.version) for s in roles.every_slot()] == [
        ("champion", 3), ("previous", 2), ("baseline", 1)]
    assert [s.role for s in roles.slots()] == ["champion"] and set(roles.score({})) == {"champion", "previous", "baseline"}
    baseline_right = {"champion": {"model_version": 3, "y_pred": "0", "proba": {}},
                      "previous": {"model_version": 2, "y_pred": "0", "proba": {}},
                      "baseline": {"model_version": 1, "y_pred": "1", "proba": {}}}
    assert roles.learn({}, "1", baseline_right).anchor is None
    assert roles.learn({}, "1", baseline_right).anchor == "promote"
    gone, back, also = roles.restore_baseline()
    assert (gone.version, back.version, back.role, also.version) == (3, 1, "champion", 2)
    assert roles.every_slot() == [back] and roles.baseline_version == 1


def test_the_baseline_is_not_let_go_when_it_does_not_win_and_can_be_turned_off():
    from driftline.learner.adaptation import Adaptation
    from driftline.shared.settings import DriftSettings, LearnerSettings

    def promoted(cfg: LearnerSettings) -> Adaptation:
        loop = Adaptation.fresh("dummy.NoChangeClassifier()", cfg, DriftSettings(), "t")
        loop.roles.start(slot("challenger", 2), Contest.from_settings(cfg))
        change = loop._conclude("promote", 10)
        assert (change.kind, change.slot.version, change.other.version) == ("promoted", 2, 1)
        return loop

    loop = promoted(LearnerSettings())
    first = loop.roles.anchor
    assert loop.roles.baseline.version == 1 and loop._anchor("drop", 20) == []
    assert loop.roles.baseline.version == 1 and loop.roles.anchor is not first  # a new contest, not a goodbye
    [change] = loop._anchor("promote", 30)
    assert (change.kind, change.slot.version, change.other.version) == ("restored", 1, 2)
    assert loop.roles.champion.version == 1 and loop.policy.version == 1

    off = promoted(LearnerSettings(keep_baseline=False))  # the old rule: it shadows as any displaced champion
    assert off.roles.baseline is None and off.roles.previous.version == 1


def test_a_verdict_is_about_the_contest_that_gave_it_not_one_a_decision_of_the_same_example_made():
    """The displaced champion and the baseline both beat the champion on the same label: the
    first restore changes the champion, so the baseline's verdict (about the one that left) is not
    applied to the one restored; the baseline shadows on, in a new contest."""
    from driftline.learner.adaptation import Adaptation
    from driftline.shared.settings import DriftSettings, LearnerSettings

    ready = lambda: Contest("margin", promote_after=1, window=1, margin=0.5, max_shadow=10)  # noqa: E731
    loop = Adaptation.fresh("dummy.NoChangeClassifier()", LearnerSettings(), DriftSettings(), "t")
    roles = loop.roles
    roles.start(slot("challenger", 2), ready())
    roles.promote(recall=ready(), anchor=ready())   # v1 shadows as the baseline
    roles.start(slot("challenger", 3), ready())
    roles.promote(recall=ready(), anchor=ready())   # v2 as the previous champion
    anchor = roles.anchor
    answers = {"champion": {"model_version": 3, "y_pred": "0", "proba": {}},
               "previous": {"model_version": 2, "y_pred": "1", "proba": {}},
               "baseline": {"model_version": 1, "y_pred": "1", "proba": {}}}
    step = loop.learn({}, "1", answers, position=0)
    assert (step.learned.recall, step.learned.anchor) == ("promote", "promote")
    assert [(c.kind, c.slot.version, c.other.version) for c in step.changes] == [("restored", 2, 3)]
    assert roles.champion.version == 2 and roles.baseline.version == 1
    assert roles.anchor is not anchor and roles.anchor.shared == 0


def test_a_champion_chosen_by_an_operator_is_the_baseline_from_then_on():
    roles = Roles(slot("champion", 1))
    roles.start(slot("challenger", 2), Contest("margin", 1, 10, 0.0, 100))
    roles.promote(recall=Contest("margin", 1, 10, 0.0, 100), anchor=Contest("margin", 1, 10, 0.0, 100))
    roles.replace_champion(slot("champion", 9))
    assert (roles.baseline, roles.anchor, roles.baseline_version) == (None, None, 9)
    # A checkpoint written before the baseline existed: its champion is where "not adapting" starts.
    old = Roles.__new__(Roles)
    old.__setstate__({"champion": slot("champion", 5), "challenger": None, "contest": None})
    assert (old.baseline, old.previous, old.baseline_version) == (None, None, 5)


# -- records and checkpoint ------------------------------------------------------------------------
def test_records_carry_their_kafka_metadata_as_fields_and_bad_bytes_raise_decode_error():
    codec = get_codec()
    fv = {"event_id": "e1", "entity_id": "m", "ts": 3.0, "features": {"a": 1.0}, "feature_set": "raw",
          "published_ms": None}
    e = decode(codec, "features", "ns.features", 2, 40, b"m", codec.encode("FeatureVector", fv), NOW)
    assert (e.event_id, e.ts, e.topic, e.partition, e.offset, e.seen, e.features) == (
        "e1", 3.0, "ns.features", 2, 40, NOW, {"a": 1.0})
    swap = {"model": "m", "from_version": None, "to_version": 1, "reason": "initial", "position": 0, "ts": 0.0}
    c = decode(codec, "model.swaps", "model.swaps", 0, 0, None, codec.encode("ModelSwap", swap), NOW)
    assert isinstance(c, Control) and c.kind == "swap" and c.value["to_version"] == 1
    with pytest.raises(DecodeError) as bad:
        decode(codec, "labels.valid", "labels.valid", 0, 0, None, b"junk", NOW)
    assert bad.value.reason in REASONS


class Blobs:
    """A Redis stand-in for `get` alone: the checkpoint's format check needs nothing else."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def get(self, key):
        return self.data.get(key)


def test_a_checkpoint_of_another_format_is_refused_loudly_and_this_format_round_trips():
    keys, secret = Keys("t"), b"k"
    with pytest.raises(TamperedArtifact):
        load_checkpoint(Blobs({keys.checkpoint("m"): dumps_signed({"format": 1}, secret)}), keys, "m", secret)
    state = LearnerState("dummy.NoChangeClassifier()", Roles(slot("champion", 1)), {("features", 0): 5}, 0,
                         [label(1)], 1, 2.0, [event(3)], [], {0: 1.5})
    blob = dumps_signed({"format": 2, "state": state}, secret)
    back = load_checkpoint(Blobs({keys.checkpoint("m"): blob}), keys, "m", secret)
    assert back.waiting == [label(1)] and back.held_events == [event(3)] and back.roles.champion.version == 1


def test_a_checkpoint_keeps_waiting_labels_and_held_events_as_read_and_loads_one_written_before_the_columns(
        monkeypatch):
    keys, secret = Keys("t"), b"k"
    vector = {"event_id": "e7", "entity_id": "m", "ts": 7.0, "features": {"a": 1.0, "b": "x"}, "feature_set": "raw",
              "published_ms": None}
    raw = get_codec().encode("FeatureVector", vector)
    read = decode(get_codec(), "features", "ns.features", 2, 70, b"m", raw, now=NOW)
    waiting = [label(i, partition=i % 2) for i in range(3)]
    waiting[1].retry_at = NOW + 0.5
    state = LearnerState("dummy.NoChangeClassifier()", Roles(slot("champion", 1)), {}, 0, waiting, 3, 2.0,
                         [read, event(8)], [], {})

    def round_trip(s):
        blob = dumps_signed({"format": 2, "state": s}, secret)
        return load_checkpoint(Blobs({keys.checkpoint("m"): blob}), keys, "m", secret)

    back = round_trip(state)
    assert back.waiting == waiting and back.held_events == [read, event(8)]
    assert back.held_events[0].vector == vector and back.held_events[0].raw == raw
    empty = round_trip(LearnerState("dummy.NoChangeClassifier()", Roles(slot("champion", 1)), {}, 0, [], 0, 0.0,
                                    [], [], {}))
    assert empty.waiting == [] and empty.held_events == []
    # One pickled before the columns (the objects themselves) still loads.
    with monkeypatch.context() as m:
        m.delattr(LearnerState, "__getstate__")
        blob = dumps_signed({"format": 2, "state": state}, secret)
    back = load_checkpoint(Blobs({keys.checkpoint("m"): blob}), keys, "m", secret)
    assert back.waiting == waiting and back.held_events == [read, event(8)]


def test_the_warm_start_buffer_rides_in_the_checkpoint_and_an_older_checkpoint_reads_the_redis_list():
    keys, secret = Keys("t"), b"k"
    buffer = ExampleBuffer(size=2)
    for position in range(3):
        buffer.add(position, {"a": float(position)}, "1", True, 1)
    state = LearnerState("dummy.NoChangeClassifier()", Roles(slot("champion", 1)), {}, 0, [], 3, 2.0, [], [], {},
                         buffer.rows())
    back = load_checkpoint(Blobs({keys.checkpoint("m"): dumps_signed({"format": 2, "state": state}, secret)}),
                           keys, "m", secret)
    assert ExampleBuffer(2, back.examples).since(None, 3) == [({"a": 1.0}, "1", True, 1), ({"a": 2.0}, "1", True, 1)]

    class RedisList:  # what an older learner left: newest first, one JSON document per example
        def lrange(self, key, start, end):
            docs = [{"p": p, "x": {"a": float(p)}, "y": "1", "h": None, "v": 1} for p in (4, 3, 2, 1)]
            return [json.dumps(d).encode() for d in docs][start:end + 1]

    older = ExampleBuffer.from_redis_list(RedisList(), "k", size=3, position=4)  # 4 was learned after it
    assert [x["a"] for x, *_ in older.since(None, 4)] == [2.0, 3.0]


def test_a_dead_letter_keeps_the_bytes_and_cuts_an_oversized_payload():
    letter = get_codec().decode(dead_letter("ns.labels.valid", "unknown_event", "why", "learner", "e1", b"x" * 10,
                                            1, 2, ts=0.0, max_payload=4), expect="DeadLetter")
    assert letter["payload"] == b"xxxx" and "cut to its first 4 of 10" in letter["detail"]
    assert (letter["key"], letter["source_topic"], letter["partition"], letter["offset"]) == (
        b"e1", "ns.labels.valid", 1, 2)


def test_after_a_crash_published_labels_are_relearned_in_order_and_their_outcomes_not_repeated():
    published = [{"event_id": "e2", "role": "champion"}, {"event_id": "e2", "role": "challenger"},
                 {"event_id": "e1", "role": "champion"}]
    replay = Replay(published, deadline=5.0)
    assert [lb.event_id for lb in replay.ready([label(1), label(3)])] == []  # e2 first, not read yet
    assert [lb.event_id for lb in replay.ready([label(1), label(2)])] == ["e2", "e1"]
    replay.learned()
    assert len(replay) == 1 and replay.published("e2", "champion") and not replay.published("e2", "champion")
    assert not replay.published("e3", "champion")
    replay.give_up()
    assert not replay and replay.published("e1", "champion")  # given up: still not published twice


# -- the inputs, with no broker there ----------------------------------------------------------------
def test_asking_whether_upstream_is_drained_with_the_broker_away_says_no_soon_and_backs_off():
    """The loop asks this between batches: with the broker away it must neither die nor wait long."""
    import time

    from driftline.infra import stack
    from driftline.learner.inputs import UPSTREAM_TIMEOUT_S, Inputs
    from driftline.shared.settings import Settings
    from driftline.shared.topics import Topics

    s = Settings(kafka_bootstrap=f"127.0.0.1:{stack.free_port()}")  # nothing listens there
    inputs = Inputs(s, Topics(s.namespace))
    for side in ("labels", "features"):
        started = time.monotonic()
        assert inputs.drained_ends(side) is None
        assert time.monotonic() - started < UPSTREAM_TIMEOUT_S + 2
        started = time.monotonic()
        assert inputs.drained_ends(side) is None  # backing off: not asked again at once
        assert time.monotonic() - started < 0.1
    inputs.close_control()


@pytest.mark.parametrize("regression", [False, True])
def test_an_outcome_encodes_as_the_plain_record(regression):
    """The Outcome the learner publishes encodes as the plain record would: only the champion's
    carries the vector."""
    from driftline.learner.outputs import Outputs
    from driftline.learner.telemetry import Telemetry
    from driftline.shared.topics import Topics

    codec = get_codec()
    out = Outputs(None, Topics("t"), "m", Telemetry("m"))
    fv = {"event_id": "e1", "entity_id": "a", "ts": 5.0, "features": {"x": 1.5, "country": "KR"},
          "feature_set": "default@1"}
    label = Label("e1", "2.5" if regression else "1", 6.0, 0.0, b"", b"e1", 3, 17)
    answer = {"model_version": 2, "y_pred": "2.0" if regression else "1", "proba": {} if regression else {"1": 0.75, "0": 0.25},
              "known": 9}
    for role in ("champion", "challenger"):
        out.outcome(fv, label, answer, role, 41, regression)
    for (_topic, blob, _key, _headers), role in zip(out.held_back, ("champion", "challenger")):
        plain = {"event_id": "e1", "entity_id": "a", "model": "m", "model_version": 2, "role": role,
                 "y_true": label.label, "y_pred": answer["y_pred"], "proba": answer["proba"], "position": 41, "ts": 5.0,
                 "features": fv["features"] if role == "champion" else None, "feature_set": "default@1",
                 "label_ts": 6.0, "label_partition": 3, "label_offset": 17, "error": -0.5 if regression else None,
                 "known": 9}
        assert blob == codec.encode("Outcome", plain)
        assert codec.decode(blob, expect="Outcome") == plain


def test_the_contest_reports_while_the_learner_records_in_another_thread():
    # /health reads the contest from a server thread while the learner's loop records into it.
    contest = Contest("margin", promote_after=10**9, window=2000, margin=0.0, max_shadow=10**9)
    for i in range(2000):
        contest.record(i % 3 == 0, i % 2 == 0)
    stop, failures = threading.Event(), []

    def learner_loop():
        i = 0
        while not stop.is_set():
            contest.record(i % 3 == 0, i % 2 == 0)
            i += 1

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so a report that iterates the live window would meet a change
    recorder = threading.Thread(target=learner_loop)
    recorder.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                report = contest.report()
            except RuntimeError as exc:
                failures.append(exc)
                break
            assert report["window"] in (2000, 2001) and report["challenger_wins"] >= 0  # 2001: mid-record
    finally:
        stop.set()
        recorder.join()
        sys.setswitchinterval(before)
    assert failures == []


def test_a_long_contest_under_the_margin_rule_reports_its_evidence_past_a_floats_range():
    # 1,200 discordant wins and no loss, the lead under the margin all along: the likelihood ratio
    # is ~2^1200; the report (asked at every verdict that ends a contest) caps it, not raises.
    contest = Contest("margin", promote_after=10, window=10_000, margin=0.9, max_shadow=10**6)
    for i in range(6000):
        contest.record(True, True)
        if i % 5 == 0:
            contest.record(False, True)
    assert contest.verdict() is None and contest.evidence() == float("inf")
    assert contest.report()["evidence"] == 1e12
