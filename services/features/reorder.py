"""The features service's merge of events.valid and labels.valid by event time (`ReorderBuffer`):
a label reaches the vectors of the events after it, never of one before it.

Each partition goes in offset order, which keeps every entity's events in offset order; items of
the two streams are interleaved by event time, with a bounded wait for the other stream.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Merge order at equal event time: labels first (a label with ts <= the event's ts is applied
# before the event's vector), then events. Bad messages never wait (they only hold their offset).
BAD, LABEL, EVENT = 0, 1, 2

@dataclass
class Item:
    kind: int
    ts: float
    topic: str
    partition: int
    offset: int
    value: Any  # the decoded record, or the Message for a BAD item
    received: float = 0.0  # monotonic seconds
    seq: int = 0
    reason: str = ""
    detail: str = ""

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

@dataclass
class ReorderBuffer:
    """Merges per-partition queues by event time, with a bounded wait for the other stream.

    An item goes when every partition of the other stream that has shown anything has shown an
    item at or after its time (so nothing earlier can still come from it, as far as partitions
    keep their own time order); or when it has waited `wait_s` and none of the partitions it
    waits for is `lagging` (holds unread data in the broker: that data is on its way, however
    long a backlog takes to read); or when more than `cap` items wait. Each partition goes in offset order, which keeps every
    entity's events in offset order.

        >>> buf = ReorderBuffer(wait_s=0.2)
        >>> buf.add(Item(EVENT, 10.0, "events.valid", 0, 0, {}))
        >>> buf.pop_ready(now=0.0)            # waits: no label at or after ts 10 yet
        []
    """

    wait_s: float
    cap: int = 20_000
    # Events also wait while an events partition of this worker that holds unread data has shown
    # only earlier times: what a worker sends on to the key fields' stages then moves on evenly in
    # event time (those stages wait for their slowest source anyway, holding the others).
    align_events: bool = False
    queues: dict[tuple[str, int], deque[Item]] = field(default_factory=dict)
    latest: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)  # tp -> (kind, max ts seen)
    done: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to commit
    released: dict[tuple[str, int], float] = field(default_factory=dict)  # latest event time let go
    # kind -> nothing of that stream at or before this time is still to come (`caught_up`)
    floor: dict[int, float] = field(default_factory=dict)
    pending: int = 0
    _seq: int = 0

    def add(self, item: Item) -> None:
        q = self.queues.setdefault(item.tp, deque())
        if item.kind == BAD:  # released right after whatever precedes it in its partition
            item.ts = q[-1].ts if q else -math.inf
        else:
            _kind, seen = self.latest.get(item.tp, (item.kind, -math.inf))
            self.latest[item.tp] = (item.kind, max(seen, item.ts))
        self._seq += 1
        item.seq = self._seq
        q.append(item)
        self.pending += 1

    def expect(self, tp: tuple[str, int], kind: int) -> None:
        """A newly assigned partition that holds unread data: the other stream waits for it too
        (an empty one does not, or an idle partition would hold everything up). What was known
        of the stream before (`caught_up`) does not cover the data it holds."""
        self.latest.setdefault(tp, (kind, -math.inf))
        self.floor.pop(kind, None)

    def mark(self, kind: int) -> float:
        """How far in time every partition of a stream has got (-inf before it showed anything),
        and at least its `floor`."""
        floor = self.floor.get(kind, -math.inf)
        return min((max(ts, floor) for k, ts in self.latest.values() if k == kind), default=floor)

    def waiting_for(self, now: float, waited_s: float) -> tuple[int, float] | None:
        """(the other stream's kind, the newest time of the first item's stream seen so far) when
        the first item in merged order has waited `waited_s` for the other stream alone; else None.

            >>> buf = ReorderBuffer(wait_s=60.0)
            >>> buf.add(Item(EVENT, 10.0, "events.valid", 0, 0, {}, received=0.0))
            >>> buf.add(Item(EVENT, 12.0, "events.valid", 0, 1, {}, received=0.0))
            >>> buf.waiting_for(now=0.01, waited_s=0.02), buf.waiting_for(now=0.02, waited_s=0.02) == (LABEL, 12.0)
            (None, True)
        """
        heads = [q[0] for q in self.queues.values() if q]
        if not heads:
            return None
        head = min(heads, key=lambda item: (item.ts, item.kind, item.seq))
        if head.kind == BAD or now - head.received < waited_s:
            return None
        other = LABEL if head.kind == EVENT else EVENT
        if head.ts <= self.mark(other):
            return None  # not waiting for the other stream (for a lagging partition of its own)
        return other, max(ts for k, ts in self.latest.values() if k == head.kind)

    def caught_up(self, kind: int, ts: float) -> None:
        """Nothing of stream `kind` at or before `ts` is still to come (the caller knows it: its
        partitions are read to their ends and nothing is on its way through the service before):
        what waits for it goes. What is published later is late, as if it came after the wait.

            >>> buf = ReorderBuffer(wait_s=60.0)
            >>> buf.add(Item(EVENT, 10.0, "events.valid", 0, 0, {}))
            >>> buf.pop_ready(now=1.0)                 # no label partition has shown anything
            []
            >>> buf.caught_up(LABEL, 10.0)
            >>> [item.offset for item in buf.pop_ready(now=1.0)]
            [0]
        """
        self.floor[kind] = max(self.floor.get(kind, -math.inf), ts)

    def pop_ready(self, now: float, lagging: frozenset | set = frozenset()) -> list[Item]:
        """The items that may go now, in merged order."""
        heap = [(q[0].ts, q[0].kind, q[0].seq, tp) for tp, q in self.queues.items() if q]
        heapq.heapify(heap)
        marks = {LABEL: self.mark(EVENT), EVENT: self.mark(LABEL)}  # what each kind waits for
        behind = {LABEL: [], EVENT: []}  # per kind, the times of the other kind's lagging partitions
        events_behind = math.inf  # the earliest time a lagging events partition has shown
        for tp in lagging:
            if tp in self.latest:
                kind, ts = self.latest[tp]
                behind[LABEL if kind == EVENT else EVENT].append(ts)
                if kind == EVENT and self.align_events:
                    events_behind = min(events_behind, ts)
        out: list[Item] = []
        while heap:
            tp = heap[0][3]
            q = self.queues[tp]
            head = q[0]
            aligned = head.kind != EVENT or head.ts <= events_behind
            if not (head.kind == BAD or self.pending > self.cap or (aligned and (
                    head.ts <= marks[head.kind]
                    or (now - head.received >= self.wait_s and all(ts >= head.ts for ts in behind[head.kind]))))):
                break  # everything after it in time waits too
            item = q.popleft()
            self.pending -= 1
            self.done[tp] = item.offset + 1
            if item.kind != BAD and item.ts > self.released.get(tp, -math.inf):
                self.released[tp] = item.ts
            out.append(item)
            if q:
                heapq.heapreplace(heap, (q[0].ts, q[0].kind, q[0].seq, tp))
            else:
                heapq.heappop(heap)
        return out

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition, the offset up to which everything is processed."""
        return {tp: (self.queues[tp][0].offset if self.queues.get(tp) else nxt) for tp, nxt in self.done.items()}

    def event_time_at_commit(self, tp: tuple[str, int]) -> float | None:
        """The least event time from the commit offset on, as far as the partition keeps its time
        order: the first waiting item's, else the latest let go (None: not known).

            >>> buf = ReorderBuffer(wait_s=0.0)
            >>> for offset, ts in enumerate((5.0, 7.0)):
            ...     buf.add(Item(EVENT, ts, "events.valid", 0, offset, {}))
            >>> [i.ts for i in buf.pop_ready(now=0.0)], buf.event_time_at_commit(("events.valid", 0))
            ([5.0, 7.0], 7.0)
        """
        q = self.queues.get(tp)
        ts = q[0].ts if q else self.released.get(tp)
        return ts if ts is not None and math.isfinite(ts) else None

    def drop(self, tps: list[tuple[str, int]]) -> None:
        """Forget partitions this consumer lost (their new owner starts from the committed offset)."""
        for tp in tps:
            self.pending -= len(self.queues.pop(tp, ()))
            self.latest.pop(tp, None)
            self.done.pop(tp, None)
            self.released.pop(tp, None)

