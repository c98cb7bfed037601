"""The event-time merge of events and labels (pure logic of `ReorderBuffer`)."""

from __future__ import annotations

from driftline.features.service import BAD, EVENT, LABEL, Item, ReorderBuffer

EV, LB = "ns.events.valid", "ns.labels.valid"


def ev(ts, partition=0, offset=0, received=0.0):
    return Item(EVENT, ts, EV, partition, offset, {"ts": ts}, received)


def lb(ts, partition=0, offset=0, received=0.0):
    return Item(LABEL, ts, LB, partition, offset, {"ts": ts}, received)


def order(items):
    return [("E" if i.kind == EVENT else "L" if i.kind == LABEL else "B", i.ts) for i in items]


def test_an_event_waits_until_a_label_at_or_after_its_time_has_been_seen():
    buf = ReorderBuffer(wait_s=10)
    buf.add(ev(10.0))
    assert buf.pop_ready(now=0.0) == []
    buf.add(lb(9.0))
    assert order(buf.pop_ready(now=0.0)) == [("L", 9.0)]  # the event at 10 was seen: label 9 may go
    buf.add(lb(12.0, offset=1))
    # now event 10 may go too; label 12 waits for an event at or after 12
    assert order(buf.pop_ready(now=0.0)) == [("E", 10.0)]
    assert buf.pending == 1


def test_an_item_waits_for_every_partition_of_the_other_stream_to_pass_its_time():
    buf = ReorderBuffer(wait_s=10)
    buf.add(ev(5.0, partition=0))
    buf.add(ev(50.0, partition=1))  # partition 1 is ahead; partition 0 may still hold events before 20
    buf.add(lb(20.0))
    assert order(buf.pop_ready(now=0.0)) == [("E", 5.0)]
    buf.add(ev(21.0, partition=0, offset=1))
    assert order(buf.pop_ready(now=0.0)) == [("L", 20.0)]


def test_a_partition_known_to_hold_data_holds_the_other_stream_until_it_shows_some():
    buf = ReorderBuffer(wait_s=10)
    buf.expect((EV, 3), EVENT)  # assigned, with unread events
    buf.add(ev(30.0, partition=0))
    buf.add(lb(20.0))
    assert buf.pop_ready(now=0.0) == []
    buf.add(ev(25.0, partition=3))
    assert order(buf.pop_ready(now=0.0)) == [("L", 20.0)]


def test_a_label_at_the_same_time_as_an_event_goes_first():
    buf = ReorderBuffer(wait_s=10)
    buf.add(ev(5.0))
    buf.add(lb(5.0))
    assert order(buf.pop_ready(now=0.0)) == [("L", 5.0), ("E", 5.0)]


def test_labels_sent_before_their_events_still_merge_by_event_time():
    buf = ReorderBuffer(wait_s=10)
    for i, ts in enumerate([1.5, 3.5]):
        buf.add(lb(ts, offset=i))
    for i, ts in enumerate([1.0, 2.0, 3.0, 4.0]):
        buf.add(ev(ts, partition=i % 2, offset=i // 2))
    assert order(buf.pop_ready(now=0.0)) == [("E", 1.0), ("L", 1.5), ("E", 2.0), ("E", 3.0)]
    # label 3.5 waits for partition 0 (at 3.0) to pass 3.5, event 4 for a label at >= 4: both in vain
    assert order(buf.pop_ready(now=20.0)) == [("L", 3.5), ("E", 4.0)]


def test_the_wait_is_bounded_but_not_while_what_it_waits_for_is_still_unread():
    buf = ReorderBuffer(wait_s=0.2)
    buf.add(lb(3.0, partition=1))
    buf.add(ev(10.0, received=1.0))
    assert order(buf.pop_ready(now=1.1)) == [("L", 3.0)]
    # label partition 1 (at 3.0) still holds unread labels: they may be before 10
    assert buf.pop_ready(now=1.3, lagging={(LB, 1)}) == []
    buf.add(lb(4.0, partition=1, offset=1))
    buf.expect((LB, 2), LABEL)
    # partition 2 was assigned with unread data; partition 1 was read to the end: still wait for 2
    assert order(buf.pop_ready(now=1.3, lagging={(LB, 2)})) == [("L", 4.0)]
    assert order(buf.pop_ready(now=1.3, lagging={(EV, 0)})) == [("E", 10.0)]  # its own backlog is no reason


def test_what_waits_for_a_stream_known_to_have_nothing_on_its_way_goes_and_what_comes_later_waits_again():
    buf = ReorderBuffer(wait_s=60)
    buf.add(ev(10.0, received=0.0))
    buf.add(ev(12.0, partition=1, received=0.0))
    assert buf.pop_ready(now=1.0) == [] and buf.waiting_for(now=1.0, waited_s=0.5) == (LABEL, 12.0)
    assert buf.waiting_for(now=0.1, waited_s=0.5) is None  # has not waited long enough to ask
    buf.caught_up(LABEL, 12.0)  # the worker asked: no label is on its way
    assert order(buf.pop_ready(now=1.0)) == [("E", 10.0), ("E", 12.0)]
    buf.add(ev(13.0, offset=1, received=1.0))
    assert buf.pop_ready(now=1.0) == []  # later than what was known: waits again
    buf.add(lb(12.5))  # published after it was asked: late, but merged by time with what still waits
    buf.add(ev(14.0, partition=1, offset=1, received=1.0))
    assert order(buf.pop_ready(now=1.0)) == [("L", 12.5)] and buf.pending == 2


def test_labels_wait_for_events_the_same_way_and_a_new_partition_with_data_undoes_what_was_known():
    buf = ReorderBuffer(wait_s=60)
    buf.add(lb(7.0, received=0.0))
    assert buf.waiting_for(now=1.0, waited_s=0.5) == (EVENT, 7.0)
    buf.caught_up(EVENT, 7.0)
    assert order(buf.pop_ready(now=1.0)) == [("L", 7.0)]
    buf.expect((EV, 4), EVENT)  # a rebalance gave us a partition with unread events
    buf.add(lb(8.0, offset=1, received=1.0))
    assert buf.pop_ready(now=1.0) == [] and buf.mark(EVENT) == float("-inf")


def test_too_many_waiting_items_go_ahead_anyway():
    buf = ReorderBuffer(wait_s=100, cap=3)
    for i in range(5):
        buf.add(ev(float(i), offset=i))
    assert order(buf.pop_ready(now=0.0)) == [("E", 0.0), ("E", 1.0)]
    assert buf.pending == 3


def test_a_partition_keeps_its_offset_order_even_when_its_times_go_back():
    buf = ReorderBuffer(wait_s=0)
    buf.add(ev(5.0, partition=0, offset=0))
    buf.add(ev(1.0, partition=0, offset=1))
    buf.add(ev(3.0, partition=1, offset=0))
    assert [(i.partition, i.offset) for i in buf.pop_ready(now=1.0)] == [(1, 0), (0, 0), (0, 1)]


def test_commit_offsets_stop_at_the_first_item_still_waiting():
    buf = ReorderBuffer(wait_s=10)
    buf.add(ev(1.0, offset=7))
    buf.add(ev(9.0, offset=8))
    buf.add(lb(2.0, partition=4, offset=30))
    assert order(buf.pop_ready(now=0.0)) == [("E", 1.0), ("L", 2.0)]  # event 9 waits for a label at >= 9
    assert buf.commit_offsets() == {(EV, 0): 8, (LB, 4): 31}


def test_a_bad_message_goes_right_after_what_precedes_it_in_its_partition():
    buf = ReorderBuffer(wait_s=10)
    buf.add(ev(1.0, offset=0))
    buf.add(Item(BAD, 0.0, EV, 0, 1, None))
    buf.add(ev(50.0, offset=2))
    buf.add(lb(3.0, partition=2, offset=0))
    assert order(buf.pop_ready(now=0.0)) == [("E", 1.0), ("B", 1.0), ("L", 3.0)]
    assert buf.commit_offsets() == {(EV, 0): 2, (LB, 2): 1}


def test_lost_partitions_are_forgotten():
    buf = ReorderBuffer(wait_s=10)
    buf.add(ev(1.0, offset=0))
    buf.add(ev(2.0, partition=1))
    buf.drop([(EV, 1)])
    assert buf.pending == 1 and (EV, 1) not in buf.queues


def test_with_key_fields_an_event_waits_for_an_events_partition_still_reading_earlier_times():
    buf = ReorderBuffer(wait_s=0.0, align_events=True)
    buf.add(Item(EVENT, 100.0, "events.valid", 0, 0, {}))
    buf.add(Item(EVENT, 90.0, "events.valid", 1, 0, {}))
    assert [i.ts for i in buf.pop_ready(now=0.0, lagging={("events.valid", 1)})] == [90.0]  # 1 has shown 90 only
    buf.add(Item(EVENT, 120.0, "events.valid", 1, 1, {}))  # 1 has got past 100
    assert [i.ts for i in buf.pop_ready(now=0.0, lagging={("events.valid", 1)})] == [100.0, 120.0]
    assert ReorderBuffer(wait_s=0.0).align_events is False  # without key fields, nothing waits for it
