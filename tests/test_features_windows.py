"""Sliding windows over event time (pure logic): every aggregate against a brute-force reference
over the raw events, the error bound of tiles, point-in-time reads, late and too-late events,
bounded memory, and the binary encoding."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from driftline.features.windows import (
    DROPPED, IN_ORDER, LATE, SKETCH, TAIL, Series, SeriesSpec, key_text, parse_window, value_hash,
)

W = 600.0


def reference(events: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """The values of the events with start < ts <= end, in folding order."""
    return [x for ts, x in events if start < ts <= end]


def fold_all(spec: SeriesSpec, events) -> Series:
    s = Series.new(spec)
    for ts, x in events:
        s.fold(ts, x)
    return s


def test_every_value_is_exact_while_a_key_has_no_more_events_than_the_tail():
    rng = random.Random(1)
    events = sorted((rng.uniform(0, 2000), rng.uniform(-50, 500)) for _ in range(TAIL))
    spec = SeriesSpec("amount", W, lateness_s=300.0)
    s = fold_all(spec, events)
    earliest = events[-1][0] - spec.lateness_s  # the oldest time an event may still come with
    for t in [rng.uniform(earliest, 2600) for _ in range(200)] + [ts for ts, _ in events if ts >= earliest]:
        xs = reference(events, t - W, t)
        got = s.summary(t)
        assert got.n == len(xs)
        assert got.total == pytest.approx(sum(xs), abs=1e-9)
        if xs:
            assert got.mean == pytest.approx(statistics.fmean(xs))
            assert got.std == pytest.approx(statistics.pstdev(xs), abs=1e-9)
            assert (got.low, got.high, got.last) == (min(xs), max(xs), xs[-1])
        else:
            assert (got.mean, got.std, got.low, got.high, got.last) == (None, None, None, None, None)


def test_a_busy_key_misses_at_most_one_tile_at_the_old_edge_and_never_counts_an_older_event():
    rng = random.Random(2)
    spec = SeriesSpec("amount", W, tiles=20)
    s = Series.new(spec)
    events: list[tuple[float, float]] = []
    ts = 0.0
    exact = 0
    for _ in range(3000):
        ts += rng.expovariate(1 / 2.0)  # ~300 events per window: far beyond the tail
        x = rng.uniform(1, 100)
        got = s.summary(ts)  # the value this event would be scored with: before it
        widest = reference(events, ts - W, ts)
        narrowest = reference(events, ts - W + spec.width, ts)
        assert len(narrowest) <= got.n <= len(widest)
        assert sum(narrowest) - 1e-6 <= got.total <= sum(widest) + 1e-6
        if widest:
            assert min(widest) <= got.low and got.high <= max(widest)
            assert got.last == widest[-1]
        exact += got.n == len(widest)
        events.append((ts, x))
        s.fold(ts, x)
    assert exact > 100  # whole tiles often fit the window exactly: the bound is not the typical error


def test_a_late_event_is_placed_by_its_time_and_reads_nothing_after_it():
    spec = SeriesSpec("amount", W)
    events = [(100.0, 1.0), (200.0, 2.0), (300.0, 3.0)]
    s = fold_all(spec, events)
    got = s.summary(150.0)  # the late event at 150 is scored with what came before 150 only
    assert (got.n, got.total, got.last) == (1, 1.0, 1.0)
    assert s.fold(150.0, 10.0) == LATE
    after = s.summary(300.0)
    assert (after.n, after.total, after.last) == (4, 16.0, 3.0)  # placed by time: the last is still 300's


def test_a_late_event_among_tiles_never_reads_a_tile_that_holds_later_events():
    spec = SeriesSpec("ts", W, tiles=10)  # 60 s tiles
    events = [(float(ts), float(ts)) for ts in range(0, 3000, 2)]  # the value is the time: later shows
    s = fold_all(spec, events)
    got = s.summary(2750.5)  # a late event's read (within the lateness): the tail holds 2936 on
    # (2150.5, 2750.5]: the tile of 2150.5 reaches back before the window, the tile of 2750.5 holds
    # 2752..2758: both are left out; the whole tiles between them, [2160, 2700), count.
    inside = [x for ts, x in events if 2160 <= ts < 2700]
    assert (got.n, got.total, got.low, got.high, got.last) == (len(inside), sum(inside), 2160.0, 2698.0, 2698.0)


def test_an_event_older_than_the_lateness_is_dropped_and_changes_nothing():
    spec = SeriesSpec("amount", W, lateness_s=60.0)
    s = fold_all(spec, [(1000.0 + i, 1.0) for i in range(5)])
    before = s.to_bytes()
    assert s.fold(1004.0 - 60.5, 99.0) == DROPPED
    assert s.to_bytes() == before
    assert s.fold(1004.0 - 10.0, 5.0) == LATE  # within the lateness: placed
    assert s.fold(1010.0, 1.0) == IN_ORDER


def test_a_count_alone_is_the_summarys_count_in_and_out_of_order_and_among_tiles():
    """`count` (what a count aggregate reads) takes a shorter path than `summary`: it must agree
    with it at every time, for the tail and the tiles, late events placed and too-late dropped."""
    rng = random.Random(11)
    spec = SeriesSpec(None, W, tiles=10, lateness_s=120.0)
    s = Series.new(spec)
    now, outcomes = 0.0, set()
    for i in range(3000):
        now += rng.expovariate(1 / 4.0)
        ts = now - rng.choice((0.0, 0.0, 0.0, rng.uniform(0, 60), rng.uniform(100, 200)))
        outcomes.add(s.fold(ts, 0.0))
        if i % 7 == 0:
            for t in (ts, now, now - rng.uniform(0, 100), now + rng.uniform(0, W), s.newest):
                assert s.count(t) == s.summary(t).n
    assert outcomes == {IN_ORDER, LATE, DROPPED} and s.tile["idx"]  # every path was taken


def test_memory_stays_bounded_however_long_the_stream():
    spec = SeriesSpec("amount", 60.0, tiles=12, lateness_s=30.0)
    s = Series.new(spec)
    sizes = []
    for i in range(20_000):
        s.fold(i * 0.05, float(i % 7))
        if i % 1000 == 999:
            sizes.append(len(s.to_bytes()))
    assert len(s.ts) <= TAIL and len(s.tile["idx"]) <= spec.retained_tiles
    assert max(sizes) <= 8 * (5 + 2 * TAIL + 9 * spec.retained_tiles)
    d = Series.new(SeriesSpec("card", 60.0, tiles=12, distinct=True))
    for i in range(20_000):
        d.fold(i * 0.05, value_hash(f"card-{i}"))
    assert all(len(h) <= SKETCH for h in d.tile["hashes"]) and len(d.tile["idx"]) <= d.spec.retained_tiles


def test_the_binary_encoding_gives_back_the_same_series():
    rng = random.Random(3)
    for distinct in (False, True):
        spec = SeriesSpec("f", W, tiles=7, distinct=distinct)
        s = Series.new(spec)
        for i in range(500):
            s.fold(i * 3.0 + rng.random(), value_hash(rng.randrange(200)) if distinct else rng.uniform(-5, 5))
        back = Series.decode(spec, s.to_bytes())
        assert back.to_bytes() == s.to_bytes()
        for t in (1000.0, 1400.0, 1499.0 * 3):
            assert back.summary(t) == s.summary(t)
    assert Series.decode(SeriesSpec("f", W), b"not a series").summary(1.0).n == 0  # unreadable: starts afresh


def test_distinct_is_exact_for_few_values_and_close_for_many():
    spec = SeriesSpec("merchant", 3600.0, distinct=True)
    few = fold_all(spec, [(float(i), value_hash(f"m{i % 25}")) for i in range(2000)])
    assert few.summary(1999.0).distinct == 25.0
    rng = random.Random(4)
    many = fold_all(spec, [(i * 0.5, value_hash(f"m{rng.randrange(10**9)}")) for i in range(6000)])
    got, true = many.summary(2999.5).distinct, 6000
    assert abs(got - true) / true < 3 / math.sqrt(SKETCH - 2)  # three standard errors


def test_hashes_and_key_texts_are_stable_across_processes():
    assert value_hash("m-17") == 1_199_033_156_339_155.0  # blake2b: no per-process seed
    assert value_hash(17.0) == value_hash("17") and key_text(17.0) == "17"
    assert 0 <= value_hash("x") < 2 ** 52 and value_hash("x").is_integer()


@pytest.mark.parametrize("text", ["10", "m", "-5m", "0s", "1w", "5 minutes"])
def test_a_window_must_be_a_positive_number_and_a_unit(text):
    with pytest.raises(ValueError, match="window"):
        parse_window(text)
