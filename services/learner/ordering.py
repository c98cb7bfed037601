"""When an event may be scored: after every label older than it (Kafka does not order two topics).

    >>> marks = LabelWatermark(idle_s=3.0)
    >>> marks.saw_labels([(0, 10.0), (1, 4.0)], now=100.0)
    >>> marks.mark([(0, False), (1, False)], now=100.0)     # the slower partition decides
    4.0
    >>> held = HeldEvents()
    >>> held.add([Event("a", 3.0, {}, "features", 0, 0, 100.0), Event("b", 9.0, {}, "features", 0, 1, 100.0)])
    >>> [e.event_id for e in held.release(4.0)], len(held)
    (['a'], 1)
    >>> flow = FlowControl(max_held=1, max_waiting=10)
    >>> flow.decide(held=1, waiting=0, features={0: 9.0, 1: 2.0}, labels={0: 4.0}, mark=2.0)
    {('features', 0)}

An event waits (held) until the label watermark -- the event time up to which every labels.valid
partition has been read -- reaches its ts, so that it is never scored by a model still missing a
label older than it, and until every features partition has reached it (the same watermark rule
over `features`), so that an older event of another partition is not scored after it. It waits as long as that takes: the
order is never given up for memory. Memory is bounded by flow control instead (`FlowControl`):
the partitions that run ahead are paused until the other side catches up.

The one exception is a label source that is idle or gone (see `LabelWatermark`): after
`label_idle_s` without a label it stops holding events back, and a label of it that comes later
is learned out of order (counted in driftline_labels_out_of_order_total).

Pure state and rules, no I/O: the worker says what it read, and which partitions are read to
their end.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable

from .records import Event

log = logging.getLogger(__name__)
INF = float("inf")


class LabelWatermark:
    """The event time up to which every labels.valid partition has been read.

    The min over partitions, not the max: a fast partition must not release events while a slow
    one still holds older labels, or learning would follow fetch timing instead of the stream's
    order. A partition read to its end counts as +inf only once it has also been *idle*: no label
    from it for `idle_s`, counted from when the features stream (re)started, and (if it had
    records) nothing left on its way through the services before us (`drained`). Being at the end
    alone proves nothing while labels are still on their way through ingestion (at a replay's
    start they trail the events by seconds), and is true for a moment after every fetch. This is
    Flink's source idleness, for the same reason. A partition that is not at its end is never
    idle, however long ago its last label: its labels are there, just not read yet (a backlog).
    """

    def __init__(self, idle_s: float, ts_by_partition: dict[int, float] | None = None,
                 empty_is_idle: bool = False) -> None:
        self.idle_s = idle_s
        # True for features (a partition no entity hashes to stays empty for good); False for
        # labels.valid, whose partitions all get labels, and whose first ones may trail the events
        # by more than idle_s at a replay's start under load: empty there means not yet arrived.
        self.empty_is_idle = empty_is_idle
        self.ts_by_partition: dict[int, float] = dict(ts_by_partition or {})  # latest label ts read
        self.seen_at: dict[int, float] = {}  # wall time of the latest label read, per partition
        self.features_arrived_at = 0.0  # wall time of the latest features message read
        self.features_resumed_at = 0.0  # when features came back after a quiet spell (or first came)

    def saw_features(self, now: float) -> None:
        if now - self.features_arrived_at >= self.idle_s:
            self.features_resumed_at = now  # a stream (re)starts: its labels get time to show up
        self.features_arrived_at = now

    def features_pending(self, now: float) -> None:
        """Features are there and not read yet (a backlog, or partitions we paused): the stream has
        not gone quiet, however long the learner took since it last read one. (Counted as quiet,
        a 3 s walk through a backlog made every empty partition wait idle_s all over again.)

        >>> w = LabelWatermark(3.0, empty_is_idle=True)
        >>> w.saw_features(10.0); w.features_pending(14.0); w.saw_features(14.5)
        >>> w.mark([(1, True)], 14.5)   # an empty partition: idle since 13.0, not 14.5
        inf

        Before the first features message it says nothing: the stream has not started, and its
        start is what an empty partition's idle time counts from.

        >>> w = LabelWatermark(3.0, empty_is_idle=True)
        >>> w.features_pending(100.0); w.saw_features(101.0)
        >>> w.mark([(1, True)], 101.5)   # 0.5 s into the stream: partition 1 may yet get older events
        -inf
        """
        if self.features_resumed_at:
            self.features_arrived_at = now

    def saw_labels(self, labels: Iterable[tuple[int, float]], now: float) -> None:
        """(partition, ts) of the labels just read."""
        for partition, ts in labels:
            self.ts_by_partition[partition] = max(self.ts_by_partition.get(partition, ts), ts)
            self.seen_at[partition] = now

    def mark(self, partitions: Iterable[tuple[int, bool]], now: float,
             drained: Callable[[int], bool] = lambda partition: True,
             floor: Callable[[int], float] = lambda partition: -INF, enough: float = INF) -> float:
        """The watermark over `partitions`: (partition, read to its end?) for every partition;
        +inf when none holds anything back. `drained(partition)` says whether anything is still on
        its way to that partition through the services before us (asked only when it decides): a
        partition that has had records is idle only when nothing is -- at its end and quiet behind
        a backlog, it lags. `floor(partition)` is the event time below which nothing more can come
        to it, as far as the services before us can tell (their commits' event times, read by
        `Inputs.upstream_floors`): a partition is never held further back than that, idle or not.
        A partition already at or past `enough` (the newest event waiting) holds back nothing that
        waits: whether it is idle is not asked (`drained` may be broker round trips).

        >>> w = LabelWatermark(3.0, empty_is_idle=True)
        >>> w.saw_features(10.0); w.saw_labels([(0, 8.0)], 10.0)
        >>> w.mark([(0, False), (1, True)], 10.5)   # partition 1 empty: it may yet get older events
        -inf
        >>> w.mark([(0, False), (1, True)], 10.5, floor={0: -INF, 1: 9.0}.get)   # nothing older than 9 is coming
        8.0
        """
        mark = INF
        for partition, at_end in partitions:
            bound = max(self.ts_by_partition.get(partition, -INF), floor(partition))
            quiet_since = max(self.seen_at.get(partition, 0.0), self.features_resumed_at)
            if bound < enough and at_end and now - quiet_since >= self.idle_s:
                if self.empty_is_idle and partition not in self.seen_at:
                    continue  # never had a record since the lease was taken: an empty partition
                if drained(partition):
                    continue
            mark = min(mark, bound)
        return mark


def features_mark(ts_by_partition: dict[int, float], partitions: Iterable[tuple[int, bool]]) -> float:
    """The event time up to which every features partition has been read, once nothing is left
    upstream (ingestion and features have read all that was published): the min of the latest ts
    read over the partitions not read to their end (+inf when all are). While upstream still has
    a backlog, the features partitions are watched like labels.valid's (`LabelWatermark`: one at
    its end holds back at its latest ts until idle), since the features service may yet write an
    older event to a partition that is at its end now.

    >>> features_mark({0: 5.0, 1: 9.0}, [(0, False), (1, False), (2, True)])
    5.0
    >>> features_mark({0: 5.0}, [(0, True), (1, False)])   # partition 1 not read yet: holds all back
    -inf
    """
    mark = INF
    for partition, at_end in partitions:
        if not at_end:
            mark = min(mark, ts_by_partition.get(partition, -INF))
    return mark


def _ts(record) -> float:
    return record.ts


class HeldEvents:
    """Events read and not yet scored, in ts order, waiting for the labels older than them."""

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self.events: list[Event] = sorted(events, key=lambda e: e.ts)
        self._ids: set[str] = {e.event_id for e in self.events}

    def __len__(self) -> int:
        return len(self.events)

    def add(self, events: Iterable[Event]) -> None:
        new = list(events)
        if not new:
            return
        self._ids.update(e.event_id for e in new)
        if self.events and new[0].ts >= self.events[-1].ts and all(
                a.ts <= b.ts for a, b in zip(new, new[1:])):
            self.events.extend(new)  # the usual case: already in order
        else:
            self.events.extend(new)
            self.events.sort(key=lambda e: e.ts)  # stable: equal ts keep arrival order

    def ids(self) -> set[str]:
        return self._ids

    def release(self, watermark: float, limit: int | None = None) -> list[Event]:
        """The held events at or below the watermark, in ts order, at most `limit` of them (the
        rest keep waiting).

        >>> held = HeldEvents([Event(f"e{i}", float(i), {}, "features", 0, i, 0.0) for i in range(5)])
        >>> [e.event_id for e in held.release(3.0, limit=2)], [e.event_id for e in held.release(3.0)]
        (['e0', 'e1'], ['e2', 'e3'])
        """
        if not self.events:
            return []
        if watermark == INF:
            cut = len(self.events)
        else:
            cut = bisect.bisect_right(self.events, watermark, key=_ts) if self.events[0].ts <= watermark else 0
        if limit is not None:
            cut = min(cut, limit)
        out, self.events = self.events[:cut], self.events[cut:]
        for e in out:
            self._ids.discard(e.event_id)
        return out


class FlowControl:
    """Which partitions to pause so that what waits in memory stays bounded, without ever
    leaving event-time order.

    `mark` is where events are released: min(label watermark, features watermark). Events wait
    (held) while labels.valid or another features partition lags; labels wait while features lag.
    When `max_held` events are held, the features partitions whose latest ts is past the mark are
    paused (they run ahead); when `max_waiting` labels wait, so are the labels.valid partitions
    past it. A side resumes when it is back under half its bound, a partition when it no longer
    runs ahead.

    It cannot stall: the partition that sets the mark is not past it, so it is never paused, and
    reading it moves the mark.
    """

    def __init__(self, max_held: int, max_waiting: int) -> None:
        self.max_held = max_held
        self.max_waiting = max_waiting
        self.paused: set[tuple[str, int]] = set()

    def decide(self, held: int, waiting: int, features: dict[int, float], labels: dict[int, float],
               mark: float) -> set[tuple[str, int]]:
        """The set of ("features" | "labels", partition) that should be paused now."""
        want: set[tuple[str, int]] = set()
        for side, count, bound, ts_by in (("features", held, self.max_held, features),
                                          ("labels", waiting, self.max_waiting, labels)):
            was_pausing = any(p[0] == side for p in self.paused)
            if count >= bound or (was_pausing and count >= bound // 2):
                want.update((side, p) for p, ts in ts_by.items() if ts > mark)
        self.paused = want
        return want
