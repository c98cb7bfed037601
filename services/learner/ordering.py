"""When an event may be scored: after every label older than it (Kafka does not order two topics).

    >>> marks = LabelWatermark(idle_s=3.0)
    >>> marks.saw_labels([(0, 10.0), (1, 4.0)], now=100.0)
    >>> marks.mark([(0, False), (1, False)], now=100.0)     # the slower partition decides
    4.0
    >>> held = HeldEvents()
    >>> held.add([Event("a", 3.0, {}, "features", 0, 0, 100.0), Event("b", 9.0, {}, "features", 0, 1, 100.0)])
    >>> [e.event_id for e in held.release(4.0, now=100.0)], len(held)
    (['a'], 1)

An event waits (held) until the label watermark -- the event time up to which every labels.valid
partition has been read -- reaches its ts, so that it is never scored by a model still missing a
label older than it. Without this a backlog of events would be scored before its labels. It waits
`patience_s` at most (labels.valid lagging far behind), and at most `max_held` events wait.

Pure state and rules, no I/O: the worker says what it read, and which labels.valid partitions are
read to their end. A partition that runs ahead shows here first (its label ts, the events it
holds back), which is where pausing it belongs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .records import Event

log = logging.getLogger(__name__)
MAX_HELD_EVENTS = 50_000  # events held for their older labels, at most
EVENT_PATIENCE_S = 10.0  # an event waits this long at most for labels.valid to catch up
INF = float("inf")


class LabelWatermark:
    """The event time up to which every labels.valid partition has been read.

    The min over partitions, not the max: a fast partition must not release events while a slow
    one still holds older labels, or learning would follow fetch timing instead of the stream's
    order. A partition read to its end counts as +inf only once it has also been *idle*: no label
    from it for `idle_s`, counted from when the features stream (re)started. Being at the end
    alone proves nothing while labels are still on their way through ingestion (at a replay's
    start they trail the events by seconds), and is true for a moment after every fetch. This is
    Flink's source idleness, for the same reason.
    """

    def __init__(self, idle_s: float, ts_by_partition: dict[int, float] | None = None) -> None:
        self.idle_s = idle_s
        self.ts_by_partition: dict[int, float] = dict(ts_by_partition or {})  # latest label ts read
        self.seen_at: dict[int, float] = {}  # wall time of the latest label read, per partition
        self.features_arrived_at = 0.0  # wall time of the latest features message read
        self.features_resumed_at = 0.0  # when features came back after a quiet spell (or first came)

    def saw_features(self, now: float) -> None:
        if now - self.features_arrived_at >= self.idle_s:
            self.features_resumed_at = now  # a stream (re)starts: its labels get time to show up
        self.features_arrived_at = now

    def saw_labels(self, labels: Iterable[tuple[int, float]], now: float) -> None:
        """(partition, ts) of the labels just read."""
        for partition, ts in labels:
            self.ts_by_partition[partition] = max(self.ts_by_partition.get(partition, ts), ts)
            self.seen_at[partition] = now

    def mark(self, partitions: Iterable[tuple[int, bool]], now: float) -> float:
        """The watermark over `partitions`: (partition, read to its end?) for every labels.valid
        partition; +inf when none holds anything back."""
        mark = INF
        for partition, at_end in partitions:
            quiet_since = max(self.seen_at.get(partition, 0.0), self.features_resumed_at)
            if at_end and now - quiet_since >= self.idle_s:
                continue
            mark = min(mark, self.ts_by_partition.get(partition, -INF))
        return mark


class HeldEvents:
    """Events read and not yet scored, waiting for the labels older than them."""

    def __init__(self, events: Iterable[Event] = (), patience_s: float = EVENT_PATIENCE_S,
                 max_held: int = MAX_HELD_EVENTS, name: str = "") -> None:
        self.events: list[Event] = list(events)
        self.patience_s = patience_s
        self.max_held = max_held
        self.name = name
        self.warned_at = 0.0

    def __len__(self) -> int:
        return len(self.events)

    def add(self, events: Iterable[Event]) -> None:
        self.events.extend(events)

    def ids(self) -> set[str]:
        return {e.event_id for e in self.events}

    def release(self, watermark: float, now: float) -> list[Event]:
        """The held events that may be scored now, in ts order: those at or below the watermark,
        those that waited `patience_s`, and the oldest beyond `max_held`."""
        if not self.events:
            return []
        held = sorted(self.events, key=lambda e: e.ts)
        if watermark == INF:
            cut = len(held)
        else:
            cut = 0
            while cut < len(held) and (held[cut].ts <= watermark or now - held[cut].seen >= self.patience_s):
                cut += 1
            cut = max(cut, len(held) - self.max_held)  # bounded memory: the oldest go anyway
            if cut and held[cut - 1].ts > watermark and now - self.warned_at >= 60:
                self.warned_at = now  # once a minute: it says labels.valid lags, not a per-event fault
                log.warning("learner %s: %d events scored before older labels arrived (labels.valid is more "
                            "than %gs behind features): learning order now follows arrival", self.name, cut,
                            self.patience_s)
        self.events = held[cut:]
        return held[:cut]
