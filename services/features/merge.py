"""Merging a key partition's inputs by event time, exactly: what makes an aggregate keyed by another
field (a merchant) equal to what one process reading the whole stream in time order computes.

A key field's stage (`keyed.py`) owns partition k of its internal topics, one topic per source (a
partition of the stage before it: events.valid for the first key field). Each source writes its
records in merge order, `order` = (order_ts, origin partition, origin offset), which never decreases
along a source, and watermarks when it has no record to say how far it has got. A record goes when
no source can still send one that comes before it:

    >>> m = WatermarkMerge(sources=(0, 1), idle_wait_s=0.2, hold_s=30.0, now=0.0)
    >>> m.add(0, offset=0, order=(10.0, 0, 5), received=0.0, value="a")
    >>> [r.value for r in m.pop_ready(now=0.1)]     # source 1 may still send something before 10
    []
    >>> m.add(1, offset=0, order=(12.0, 1, 3), received=0.1, value="b")
    >>> [r.value for r in m.pop_ready(now=0.1)]     # 1 has got to 12: 'a' goes, 'b' waits for 0
    ['a']
    >>> m.watermark(0, offset=1, mark=15.0, received=0.2)
    >>> [r.value for r in m.pop_ready(now=0.2)]     # 0 has got to 15: 'b' goes
    ['b']

A source with nothing waiting holds back every record whose order_ts is not below its mark, unless
- it is idle (it said it had read everything it had, and says so again within `silence_s`: a
  writer that stops while idle is not idle for long) and the record has waited `idle_wait_s` here,
  the time a straggler still in flight gets (the reorder wait), or
- it is stalled: its input partition holds nothing unread here and it has said nothing for `hold_s`
  (its writer stopped, say a crash before its partitions moved on: a live writer says where each
  of its sources is at least every `keyed.HEARTBEAT_S`, however far behind it is). The record
  then goes *stale*: `Pending.staleness` says how far in event time that source was behind it
  (None: the source never said anything). Time this merge itself was not looked at (its own
  worker stopped) does not count against the sources.
A source whose input partition still holds unread data (`lagging`) always holds: its records are on
their way, however long a backlog takes. Memory is bounded by the caller pausing a partition whose
queue is long (`queued`), and by `cap`: past it the earliest record goes whatever holds it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Order = tuple[float, int, int]  # (order_ts, origin partition, origin offset)
AWAY_S = 1.0  # a gap this long between two looks means this worker itself was not running


@dataclass(slots=True)
class Pending:
    """A record waiting in the merge (and, once let go, how stale its key's state may be)."""

    order: Order
    source: int
    offset: int  # in its input partition
    received: float  # monotonic seconds
    value: Any
    staleness: float | None = 0.0  # event seconds a stalled source was behind it (None: never heard of)


@dataclass(slots=True)
class _Source:
    heard: float  # when it last said anything (monotonic seconds)
    mark: float = -math.inf  # every later record of this source has an order_ts at or after this
    idle: bool = False  # its last watermark said it had nothing left to read
    next_offset: int | None = None  # in its input partition, after the last record taken from it
    queue: deque = field(default_factory=deque)


class WatermarkMerge:
    """The records of one key partition's sources, let go in merge order (module docstring)."""

    def __init__(self, sources: Iterable[int], idle_wait_s: float, hold_s: float, now: float,
                 silence_s: float = 1.5, cap: int = 100_000) -> None:
        self.sources = {s: _Source(heard=now) for s in sources}
        self.idle_wait_s = idle_wait_s
        self.hold_s = hold_s
        self.silence_s = silence_s
        self.cap = cap
        self.pending = 0
        self.released = -math.inf  # the order_ts of the latest record let go
        self.looked = now  # when pop_ready last ran

    # -- what comes in ---------------------------------------------------------------------------
    def add(self, source: int, offset: int, order: Order, received: float, value: Any) -> None:
        """A record of `source` at `offset` of its input partition."""
        src = self.sources[source]
        src.queue.append(Pending(order, source, offset, received, value))
        self.pending += 1
        src.next_offset = offset + 1
        src.idle = False
        src.heard = received
        src.mark = max(src.mark, order[0])

    def watermark(self, source: int, offset: int, mark: float, received: float, idle: bool = False) -> None:
        """A watermark of `source` at `offset`: every later record of it has an order_ts at or after
        `mark`; `idle`: it had nothing left to read when it said so."""
        src = self.sources[source]
        src.next_offset = offset + 1
        src.idle = idle
        src.heard = received
        src.mark = max(src.mark, mark)

    # -- what goes out ---------------------------------------------------------------------------
    def pop_ready(self, now: float, lagging: frozenset | set = frozenset()) -> list[Pending]:
        """The records that may go now, in merge order. `lagging`: the sources whose input
        partition holds data not read yet."""
        sources = self.sources
        if now - self.looked > AWAY_S:  # this worker was away (frozen, starved): not the sources' fault
            for src in sources.values():
                src.heard += now - self.looked
        self.looked = now
        heap = [(src.queue[0].order, s) for s, src in sources.items() if src.queue]
        heapq.heapify(heap)
        out: list[Pending] = []
        while heap:
            order, s = heap[0]
            head = sources[s].queue[0]
            staleness: float | None = 0.0
            for other, src in sources.items():
                if other == s or src.queue or src.mark > order[0]:
                    continue  # it has a later record waiting, or has got past this one
                if other in lagging:
                    break
                if src.idle and now - src.heard < self.silence_s:
                    if now - head.received >= self.idle_wait_s:
                        continue
                    break
                if self._stalled(src, now):  # go without it
                    staleness = None if staleness is None or src.mark == -math.inf else max(
                        staleness, order[0] - src.mark)
                    continue
                break
            else:
                self._release(head, staleness, out, heap)
                continue
            if self.pending <= self.cap:
                break  # everything after it in merge order waits too
            self._release(head, self._behind(order[0]), out, heap)  # memory first
        return out

    def _stalled(self, src: _Source, now: float) -> bool:
        return now - src.heard >= self.hold_s

    def _release(self, head: Pending, staleness: float | None, out: list, heap: list) -> None:
        src = self.sources[head.source]
        src.queue.popleft()
        self.pending -= 1
        head.staleness = staleness
        if head.order[0] > self.released:
            self.released = head.order[0]
        out.append(head)
        if src.queue:
            heapq.heapreplace(heap, (src.queue[0].order, head.source))
        else:
            heapq.heappop(heap)

    def _behind(self, ts: float) -> float | None:
        marks = [src.mark for src in self.sources.values() if not src.queue and src.mark <= ts]
        if any(m == -math.inf for m in marks):
            return None
        return max((ts - m for m in marks), default=0.0)

    # -- where it stands -------------------------------------------------------------------------
    def queued(self, source: int) -> int:
        return len(self.sources[source].queue)

    def commit_offset(self, source: int) -> int | None:
        """The offset of `source`'s input partition up to which everything is handled (None: nothing
        taken from it yet)."""
        src = self.sources[source]
        return src.queue[0].offset if src.queue else src.next_offset

    def event_time_at_commit(self, source: int) -> float | None:
        """The least order_ts from the commit offset on (None: not known)."""
        src = self.sources[source]
        ts = src.queue[0].order[0] if src.queue else src.mark
        return ts if math.isfinite(ts) else None

    def mark(self, now: float, lagging: frozenset | set = frozenset()) -> tuple[float, bool]:
        """How far the records this merge lets go have got, for the next stage's watermark: every
        later one has an order_ts at or after it (unless it comes late from a source gone stale or
        idle), and whether every source is idle with nothing waiting."""
        least, idle = math.inf, True
        for s, src in self.sources.items():
            if src.queue:
                least, idle = min(least, src.queue[0].order[0]), False
                continue
            least = min(least, src.mark)
            if s in lagging or not (src.idle and now - src.heard < self.silence_s):
                idle = False
        return max(self.released, least), idle
