"""The watermark merge of a key partition's inputs (pure logic): records go in merge order and only
once no source can still send one before them, whatever the interleaving of arrivals; idle and
stalled sources, lagging partitions, commit offsets, the memory cap."""

from __future__ import annotations

import math
import random

from driftline.features.merge import WatermarkMerge


def looked_at(m: WatermarkMerge, start: float, end: float, step: float = 0.5) -> list:
    """pop_ready called every `step` seconds from start to end (a running worker looks that often),
    what went out."""
    out, t = [], start
    while t < end - 1e-9:
        out += m.pop_ready(t)
        t += step
    return out


def sources_of(rng: random.Random, n_sources: int, per_source: int) -> dict[int, list[tuple]]:
    """Per source, records in merge order: (order_ts, origin partition, origin offset), with ties."""
    out = {}
    for s in range(n_sources):
        ts, records = 0.0, []
        for offset in range(per_source):
            ts += rng.choice((0.0, 0.5, 1.0, 3.0))  # equal times within and across sources
            records.append((ts, s, offset))
        out[s] = records
    return out


def test_records_go_in_merge_order_and_never_before_a_source_could_still_send_an_earlier_one():
    for seed in range(20):
        rng = random.Random(seed)
        streams = sources_of(rng, n_sources=rng.randint(1, 5), per_source=rng.randint(0, 60))
        m = WatermarkMerge(streams, idle_wait_s=0.2, hold_s=30.0, now=0.0)
        cursor = {s: 0 for s in streams}
        released, now = [], 0.0
        while any(cursor[s] < len(records) for s, records in streams.items()):
            s = rng.choice([s for s in streams if cursor[s] < len(streams[s])])
            order = streams[s][cursor[s]]
            m.add(s, offset=cursor[s], order=order, received=now, value=order)
            cursor[s] += 1
            if rng.random() < 0.3:  # a watermark: the next record's time, when it has one
                s2 = rng.choice(list(streams))
                if cursor[s2] < len(streams[s2]):
                    m.watermark(s2, offset=cursor[s2] + 1000, mark=streams[s2][cursor[s2]][0], received=now)
            now += 0.01  # never long enough for a hold: sources keep moving
            for r in m.pop_ready(now):
                # nothing still to come may come before it
                for s2, records in streams.items():
                    assert all(o >= r.order for o in records[cursor[s2]:]), (seed, r.order, s2)
                assert r.staleness == 0.0
                released.append(r.order)
        for s in streams:
            m.watermark(s, offset=10_000, mark=math.inf, received=now)
        released += [r.order for r in m.pop_ready(now)]
        assert released == sorted(o for records in streams.values() for o in records), seed
        assert m.pending == 0


def test_equal_times_from_two_sources_go_in_origin_order():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=30.0, now=0.0)
    m.add(1, 0, (5.0, 1, 9), 0.0, "second")
    m.add(0, 0, (5.0, 0, 3), 0.0, "first")
    m.watermark(0, 1, 6.0, 0.0)
    m.watermark(1, 1, 6.0, 0.0)
    assert [r.value for r in m.pop_ready(0.0)] == ["first", "second"]


def test_a_source_at_the_same_time_still_holds_a_record_back():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=30.0, now=0.0)
    m.add(0, 0, (5.0, 0, 3), 0.0, "a")
    m.watermark(1, 0, 5.0, 0.0)  # 1 may still send a record at 5.0 that comes before it
    assert m.pop_ready(0.1) == []
    m.watermark(1, 1, 5.5, 0.1)
    assert [r.value for r in m.pop_ready(0.1)] == ["a"]


def test_an_idle_source_holds_a_record_for_the_reorder_wait_only():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=30.0, now=0.0)
    m.watermark(1, 0, 3.0, 0.0, idle=True)
    m.add(0, 0, (10.0, 0, 0), 1.0, "a")
    assert m.pop_ready(1.1) == []  # a straggler of 1 might still be in flight
    assert [(r.value, r.staleness) for r in m.pop_ready(1.25)] == [("a", 0.0)]
    # and once idle, a source that sends again is merged as before
    m.add(1, 1, (11.0, 1, 0), 1.3, "b")
    m.add(0, 1, (12.0, 0, 1), 1.3, "c")
    assert [r.value for r in m.pop_ready(1.3)] == ["b"]


def test_an_idle_source_that_falls_silent_holds_like_any_other_then_goes_stale():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=5.0, now=0.0, silence_s=1.5)
    m.watermark(1, 0, 3.0, 0.0, idle=True)  # and never a word again: its writer stopped
    looked_at(m, 0.5, 1.6)
    m.add(0, 0, (10.0, 0, 0), 1.6, "a")
    assert looked_at(m, 1.7, 5.0) == []  # not heard for 1.5 s: no longer taken as idle
    assert [(r.value, r.staleness) for r in m.pop_ready(5.0)] == [("a", 7.0)]  # 5 s after its last word
    m.watermark(1, 1, 3.0, 5.1, idle=True)  # back: idle again, heard
    m.add(0, 1, (11.0, 0, 1), 5.1, "b")
    assert [(r.value, r.staleness) for r in m.pop_ready(5.4)] == [("b", 0.0)]


def test_a_source_whose_partition_holds_unread_data_holds_however_long():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=5.0, now=0.0)
    m.watermark(1, 0, 3.0, 0.0, idle=True)
    m.add(0, 0, (10.0, 0, 0), 0.0, "a")
    assert m.pop_ready(1000.0, lagging={1}) == []
    assert [r.value for r in m.pop_ready(1000.0)] == ["a"]


def test_a_silent_source_is_waited_for_hold_s_then_its_gap_is_the_staleness():
    m = WatermarkMerge((0, 1, 2), idle_wait_s=0.2, hold_s=5.0, now=0.0)
    m.watermark(1, 0, 40.0, 1.0)  # its last word
    m.watermark(2, 0, 100.0, 0.0)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5):  # the others keep talking
        m.watermark(2, 1, 100.0, t)
        m.pop_ready(t)
    for i in range(3):
        m.add(0, i, (50.0 + i, 0, i), 5.5, i)
    assert m.pop_ready(5.9) == []
    assert [(r.value, r.staleness) for r in m.pop_ready(6.0)] == [(0, 10.0), (1, 11.0), (2, 12.0)]
    never = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=5.0, now=0.0)
    never.add(0, 0, (1.0, 0, 0), 0.0, "x")
    looked_at(never, 0.5, 5.0)
    assert [(r.value, r.staleness) for r in never.pop_ready(5.0)] == [("x", None)]


def test_a_source_that_keeps_talking_is_never_given_up_however_far_behind():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=5.0, now=0.0)
    m.add(0, 0, (100.0, 0, 0), 0.0, "ahead")
    for t in range(1, 60):  # a minute: its writer busy elsewhere, its mark never moving
        m.watermark(1, t, 1.0, float(t))
        assert m.pop_ready(float(t)) == []
    m.watermark(1, 100, 100.5, 60.0)
    assert [r.value for r in m.pop_ready(60.0)] == ["ahead"]


def test_time_the_merge_itself_was_not_looked_at_does_not_count_against_its_sources():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=5.0, now=0.0)
    m.watermark(1, 0, 5.0, 0.0)
    m.add(0, 0, (10.0, 0, 0), 0.0, "a")
    assert m.pop_ready(0.1) == []
    assert m.pop_ready(30.0) == []  # its own worker was frozen 30 s: source 1 gets its hold again
    m.watermark(1, 1, 11.0, 30.1)
    assert [(r.value, r.staleness) for r in m.pop_ready(30.1)] == [("a", 0.0)]


def test_commit_offsets_stop_at_the_first_waiting_record_and_carry_its_time():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=30.0, now=0.0)
    assert m.commit_offset(0) is None and m.event_time_at_commit(0) is None
    m.add(0, 7, (10.0, 0, 0), 0.0, "a")
    m.add(0, 8, (11.0, 0, 1), 0.0, "b")
    m.watermark(1, 3, 10.5, 0.0)
    assert [r.value for r in m.pop_ready(0.0)] == ["a"]
    assert (m.commit_offset(0), m.event_time_at_commit(0)) == (8, 11.0)
    assert (m.commit_offset(1), m.event_time_at_commit(1)) == (4, 10.5)


def test_past_the_cap_the_earliest_record_goes_and_says_how_stale():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=30.0, now=0.0, cap=2)
    m.watermark(1, 0, 5.0, 0.0)
    for i in range(4):
        m.add(0, i, (10.0 + i, 0, i), 0.0, i)
    out = m.pop_ready(0.0)
    assert [(r.value, r.staleness) for r in out] == [(0, 5.0), (1, 6.0)] and m.pending == 2


def test_the_mark_for_the_next_stage_is_the_least_time_still_to_go():
    m = WatermarkMerge((0, 1), idle_wait_s=0.2, hold_s=30.0, now=0.0)
    assert m.mark(0.0) == (-math.inf, False)
    m.add(0, 0, (10.0, 0, 0), 0.0, "a")
    m.watermark(1, 0, 7.0, 0.0)
    assert m.mark(0.0) == (7.0, False)
    m.watermark(1, 1, 12.0, 0.0, idle=True)
    assert [r.value for r in m.pop_ready(0.0)] == ["a"]
    m.watermark(0, 1, 20.0, 0.0, idle=True)
    assert m.mark(0.0) == (12.0, True)
    assert m.mark(100.0) == (12.0, False)  # silent for long: maybe stopped, no longer said to be idle
