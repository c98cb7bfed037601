"""The delayed join: labels waiting for their events, scored events waiting for their labels.

    >>> join = DelayedJoin(hold_s=0.2, patience_s=10.0, grace_s=30.0)
    >>> join.add([Label("e2", "1", ts=2.5, seen=100.0, raw=b"", key=None, partition=0, offset=0)])
    >>> events = [Event("e1", 1.0, {}, "features", 0, 0, 100.0), Event("e2", 2.0, {}, "features", 0, 1, 100.0),
    ...           Event("e3", 3.0, {}, "features", 0, 2, 100.0)]
    >>> due = join.due(events, held=set(), now=100.0)
    >>> [getattr(step, "label", step.event_id) for step in join.plan(events, due)]   # learn before e3
    ['e1', 'e2', '1', 'e3']

driftline's counterpart of river's progressive validation with delayed labels: walk the events in
ts order and, before scoring each, learn the waiting labels whose ts is not after it (the
replay's point-in-time rule). A label is *due* when event time has reached it, when the features
stream has been idle for the hold, when its event was scored and it waited `patience_s` (a
producer whose label clock runs ahead), or when it is overdue. A label whose event is held (not
scored yet, waiting for older labels) is never due: it waits for it, however long.

*Overdue* is the grace rule, shared by learning from a snapshot and dead-lettering: the label
waited `grace_s` *and* its event can no longer be on its way -- the features stream has been
quiet for as long, or event time on it moved past the label's own ts by the grace -- *and*
nothing is on its way at all (`current`: the worker's word that every features partition is read
to its end and ingestion and features have nothing left to read). Wall time and event time alone
are no proof: behind a backlog the event's vector may be minutes away. The early releases (the
features stream idle for the hold, a label clock running ahead) need `current` too: under a
backlog an idle moment is a stall, not the end of the stream, and the events still to come are
older than the label.

Pure state and rules, no I/O: snapshots read from Redis come in as arguments.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from ..features.store import Snapshot
from .records import Event, Label

RECENT_EVENTS = 50_000  # scored events kept in memory for their labels (older: read from Redis)
RETRY_S = 0.5  # a label looked up in Redis and not found is not looked up again sooner


def _ts(label: Label) -> float:
    return label.ts


class DelayedJoin:
    def __init__(self, hold_s: float, patience_s: float, grace_s: float, waiting: Iterable[Label] = (),
                 clock: float = float("-inf"), recent_max: int = RECENT_EVENTS) -> None:
        self.hold_s = hold_s
        self.patience_s = patience_s
        self.grace_s = grace_s
        self.recent_max = recent_max
        # Labels read, not yet learned, in ts order (arrival order among equal ts): the due ones
        # are then mostly a prefix, found by bisection, not a scan of a backlog's worth of labels.
        self.waiting: list[Label] = sorted(waiting, key=_ts)
        # No later than the earliest `seen` among them (kept exact by `add` and every full scan; a
        # label learned since may leave it earlier than it is): the rules that need a label to
        # have waited some time skip their scan of every waiting label while none can have.
        self.waiting_since = min((lb.seen for lb in self.waiting), default=float("inf"))
        self._prefix = 0  # how many of `waiting` the last due() took by ts alone
        self.clock = clock  # event time of the latest scored event
        self.recent: OrderedDict[str, Snapshot] = OrderedDict()  # scored events whose label has not come
        self.learned_ids: OrderedDict[str, None] = OrderedDict()  # to drop a label delivered twice
        self.learned_ts = float("-inf")  # latest label ts learned: the order check
        self.last_feature_at = 0.0  # wall time events last came to be scored
        self.current = True  # nothing on its way through the pipeline (the worker says; see the module doc)
        # Every label up to this ts is read (the worker's label watermark): a label released early
        # must not be, or an older one still on its way would be learned after it.
        self.label_mark = float("inf")
        self.ahead = 0  # of the labels the last due() gave, those event time had not reached (early, overdue)

    def add(self, labels: Iterable[Label]) -> None:
        new = sorted(labels, key=_ts)
        if not new:
            return
        in_order = not self.waiting or new[0].ts >= self.waiting[-1].ts
        self.waiting.extend(new)
        self.waiting_since = min(self.waiting_since, min(lb.seen for lb in new))
        if not in_order:
            self.waiting.sort(key=_ts)  # stable, and linear on the few sorted runs it gets

    def first_after(self, ts: float) -> Label | None:
        """The first waiting label (in ts order) later than `ts`: of those beyond the label
        watermark, the one that has waited longest.

            >>> join = DelayedJoin(0.0, 1.0, 30.0)
            >>> join.add([Label(f"e{i}", "1", float(i), 0.0, b"", None, 0, i) for i in (3, 1, 2)])
            >>> join.first_after(1.5).event_id, join.first_after(3.0)
            ('e2', None)
        """
        i = bisect.bisect_right(self.waiting, ts, key=_ts)
        return self.waiting[i] if i < len(self.waiting) else None

    # -- the rules ------------------------------------------------------------------------------
    def overdue(self, label: Label, now: float) -> bool:
        """Waited its grace, and its event could no longer be on its way (see the module doc)."""
        grace = self.grace_s
        return self.current and now - label.seen >= grace and (now - self.last_feature_at >= grace
                                                               or self.clock >= label.ts + grace)

    def due(self, events: list[Event], held: set[str], now: float) -> list[Label]:
        """The waiting labels to try now, as these `events` (ts order) are about to be scored."""
        horizon = max([self.clock] + [e.ts for e in events])
        self.ahead = 0
        if events:
            self.last_feature_at = now
        # A label later than every event seen waits for the events before it; it is released early
        # only when the features stream has been quiet for the hold (the end of a replay, an idle
        # hour), or after `patience_s` once its event is scored (a label clock running ahead).
        # Never while events are held: they are older than such a label, and wait to be scored first.
        early = self.current and not held
        idle = early and now - self.last_feature_at >= self.hold_s
        self._prefix = cut = bisect.bisect_right(self.waiting, horizon, key=_ts)
        due = [lb for lb in self.waiting[:cut] if lb.event_id not in held]
        if not self.current:  # no early release and nothing overdue while something is on its way
            return due
        waited = now - self.waiting_since  # no label beyond the prefix has waited longer
        if not idle and waited < self.grace_s and not (early and waited >= self.patience_s):
            return due  # none can be released early or be overdue: no scan
        in_order = self.label_mark  # an early release waits for the labels older than it, as an event does
        ahead = [lb for lb in self.waiting[cut:] if lb.event_id not in held and (
            (idle and now - lb.seen >= self.hold_s and lb.ts <= in_order)
            or (early and lb.event_id in self.recent and now - lb.seen >= self.patience_s and lb.ts <= in_order)
            or self.overdue(lb, now))]
        self.ahead = len(ahead)
        return due + ahead

    def to_look_up(self, due: list[Label], now: float, events: list[Event] = ()) -> list[Label]:
        """The due labels whose event is not in memory (read their snapshot from Redis). A label
        whose event is scored in this same walk (`events`) is learned from memory right after it.

        >>> join = DelayedJoin(1.0, 1.0, 60.0)
        >>> labels = [Label(f"e{i}", "1", 5.0, 0.0, b"", None, 0, i) for i in (1, 2)]
        >>> [lb.event_id for lb in join.to_look_up(labels, 0.0, [Event("e1", 5.0, {}, "features", 0, 1, 0.0)])]
        ['e2']
        """
        walk = {e.event_id for e in events}
        return [lb for lb in due if lb.event_id not in self.recent and lb.event_id not in walk and lb.retry_at <= now]

    @staticmethod
    def plan(events: list[Event], due: list[Label]) -> Iterator[Event | Label]:
        """The walk: each event after the due labels not later than it, then the remaining labels.
        A label never comes before its own event: one as old as its event (delay 0, the same ts)
        or older (a label clock behind) comes right after it, as in river's loop (predict, then
        learn, then the next event). Before it, it could not be learned, and would wait until
        after every event of the walk. Sorts `due` by ts.

        >>> same = [Event(f"e{i}", 5.0, {}, "features", 0, i, 0.0) for i in (1, 2)]
        >>> labels = [Label(f"e{i}", "1", 5.0, 0.0, b"", None, 0, i) for i in (2, 1)]
        >>> [(type(s).__name__[0], s.event_id) for s in DelayedJoin.plan(same, labels)]
        [('E', 'e1'), ('L', 'e1'), ('E', 'e2'), ('L', 'e2')]
        """
        due.sort(key=lambda lb: lb.ts)
        coming = {e.event_id for e in events}  # events of this walk not yet scored
        after: dict[str, list[Label]] = {}  # event id -> its labels, to learn right after it
        i = 0
        for event in events:
            while i < len(due) and due[i].ts <= event.ts:
                if due[i].event_id in coming:
                    after.setdefault(due[i].event_id, []).append(due[i])
                else:
                    yield due[i]
                i += 1
            yield event
            coming.discard(event.event_id)
            yield from after.pop(event.event_id, ())
        yield from due[i:]

    def snapshot_for(self, label: Label, stored: dict[str, Snapshot], now: float) -> Snapshot | None:
        """The label's event (vector + predictions), or None while it is not ready: its vector is
        still on its way, or it has not been scored by the champion yet and the label is not overdue."""
        snap = self.recent.get(label.event_id) or stored.get(label.event_id)
        if snap is None or snap.vector is None:
            return None
        if "champion" not in snap.predictions and not self.overdue(label, now):
            return None
        return snap

    # -- bookkeeping ----------------------------------------------------------------------------
    def scored(self, event: Event, snapshot: Snapshot) -> None:
        """An event was scored: keep it in memory for its label."""
        self.recent[event.event_id] = snapshot
        while len(self.recent) > self.recent_max:
            self.recent.popitem(last=False)  # older ones are read back from their snapshot
        self.clock = max(self.clock, event.ts)

    def first_copies(self, events: list[Event], held: set[str]) -> list[Event]:
        """The events not seen before, in their order. A vector published again (a features
        service that restarted before committing what it had published reads it and sends it
        once more) is the same event: it was scored by its first copy, or waits `held`, and a
        second scoring would publish a second prediction, made by a model that may know labels
        newer than the event.

            >>> join = DelayedJoin(0.2, 10.0, 30.0)
            >>> first = Event("e1", 1.0, {}, "features", 0, 0, 0.0)
            >>> join.scored(first, Snapshot({}, {}))
            >>> again = [Event(i, 1.0, {}, "features", 0, n, 0.0) for n, i in enumerate(("e1", "e2", "e2", "e3"), 7)]
            >>> [e.event_id for e in join.first_copies(again, held={"e3"})]
            ['e2']
        """
        seen: set[str] = set()  # in this batch
        out = []
        for event in events:
            i = event.event_id
            if i in seen or i in held or i in self.recent or i in self.learned_ids:
                continue
            seen.add(i)
            out.append(event)
        return out

    def learned_before(self, label: Label) -> bool:
        """A label delivered twice (its event's label was learned already)."""
        return label.event_id in self.learned_ids

    def learned_before_event(self, event_id: str) -> bool:
        """Was this event's label learned already? (Then scoring it now would leak its label.)"""
        return event_id in self.learned_ids

    def learn(self, label: Label, event_ts: float | None = None) -> bool:
        """Record a label as learned; True when the learning order left the stream's: a label of
        a later ts was learned before it, or an event of a later ts than it (and than its own
        event, `event_ts`: a label older than its event is learned right after it, as in river's
        loop) was scored without it. The second is what a label that reached Kafka after a later
        event looks like, when no later label had come yet.

            >>> join = DelayedJoin(1.0, 1.0, 60.0)
            >>> join.scored(Event("e1", 1.0, {}, "features", 0, 0, 0.0), Snapshot({}, {}))
            >>> join.scored(Event("e2", 3.0, {}, "features", 0, 1, 0.0), Snapshot({}, {}))
            >>> join.learn(Label("e1", "1", 2.0, 0.0, b"", None, 0, 0), event_ts=1.0)   # e2 was scored without it
            True
            >>> join.learn(Label("e2", "1", 2.5, 0.0, b"", None, 0, 1), event_ts=3.0)   # older than its event
            False
        """
        at = label.ts if event_ts is None else max(label.ts, event_ts)  # where river's loop learns it
        late = label.ts < self.learned_ts or at < self.clock
        self.learned_ts = max(self.learned_ts, label.ts)
        self.recent.pop(label.event_id, None)
        self.learned_ids[label.event_id] = None
        if len(self.learned_ids) > self.recent_max:
            self.learned_ids.popitem(last=False)
        return late

    def settle(self, due: list[Label], learned: set[int], looked_up: Iterable[str], now: float) -> None:
        """After a walk: the learned labels (by id()) stop waiting; those looked up in Redis and
        not found are not looked up again at once."""
        looked_up = set(looked_up)
        for lb in due:
            if id(lb) not in learned and lb.event_id in looked_up:
                lb.retry_at = now + RETRY_S
        if not learned:
            return
        cut = self._prefix
        head = self.waiting[:cut]
        kept = [lb for lb in head if id(lb) not in learned]
        if len(head) - len(kept) == len(learned):  # all learned from the prefix: the rest stays as is
            self.waiting[:cut] = kept
        else:
            self.waiting = [lb for lb in self.waiting if id(lb) not in learned]
        self._prefix = 0

    def expire(self, now: float, held: set[str]) -> list[Label]:
        """Remove and return the overdue labels (for the DLQ); those of `held` events are not lost."""
        if not self.current:
            return []  # nothing is overdue while something is on its way (see `overdue`)
        if now - self.waiting_since < self.grace_s:
            return []  # none has waited its grace yet: no scan (run at every step of the worker)
        keep, gone = [], []
        for lb in self.waiting:
            (gone if lb.event_id not in held and self.overdue(lb, now) else keep).append(lb)
        self.waiting = keep
        self.waiting_since = min((lb.seen for lb in keep), default=float("inf"))
        return gone
