"""The learner's worker: scores every event with the champion (and challenger), learns once from every label.

One active learner per model name holds a Redis lease; another instance waits as a standby and
takes over from the last checkpoint when the active one stops renewing. The active learner reads
all partitions of `features`, `labels.valid`, `retrain.requests` and `model.swaps` from the offsets
of its checkpoint (never group-managed offsets: the checkpoint *is* the commit), and per batch:

    read (inputs.py) -> decode (records.py) -> control: retrain requests, swaps made elsewhere ->
    release the events whose older labels are all in (ordering.py) -> walk them in ts order:
    learn the labels due before each one, joined with the event's vector and predictions (join.py),
    then score it -> the drift loop decides at each example (adaptation.py: detect, retrain,
    contest, promote) -> produce (outputs.py) + one Redis pipeline; the registry records what the
    loop decided (lineage.py) -> checkpoint every N labels / T seconds (checkpoint.py)

The loop itself is the shared one (`loop.StreamWorker.run`), inside the lease loop below; its
commit policy is the checkpoint (`commits.CheckpointCommits`): nothing is flushed or committed per
batch.

Concept drift, data drift and the label-count and accuracy triggers are decided here, in the
learner's own loop, at the example where they are seen: nothing waits for another service, and
the same stream gives the same decisions at any speed. The drift service publishes what does not
come from the stream (an operator's demand, a schedule) as retrain requests, taken at the position
the learner has reached when it reads them.

It must never learn a label twice nor skip one: offsets, models, waiting labels and counters are
checkpointed together, and after a crash the outcomes already published since the checkpoint are
read back so that those labels are re-learned in the same order without being published again.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import redis
from confluent_kafka import KafkaException, Message

from ..features.store import Snapshot, Snapshots
from ..shared import deps, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.kafka import base_topic
from ..shared.keys import Keys
from ..shared.registry import ModelRegistry
from ..shared.commits import CheckpointCommits
from ..shared.loop import RestartLoop, StreamWorker
from ..shared.settings import Settings
from .adaptation import Adaptation, Change
from .champion import PUBLISHED, Roles
from .checkpoint import (Lease, LearnerState, Replay, high_watermark, load_checkpoint, outcomes_since,
                         records_since, save_checkpoint)
from .examples import ExampleBuffer
from .inputs import Inputs
from .join import DelayedJoin
from .labels import is_regressor, label_problem
from .lineage import Lineage
from .outputs import ORIGIN_HEADER, Outputs
from .ordering import INF, FlowControl, HeldEvents, LabelWatermark, features_mark
from .records import Control, Event, Label, decode
from .telemetry import Telemetry
from .updates import UpdatePacer

log = logging.getLogger(__name__)
SERVICE = "learner"
# How long an event waits before the upstream services' commits are read (and then how often, at
# most, while it still waits): a few broker round trips, and ingestion and features commit every
# 0.1 s by default. Live, an event waits a few ms for the next label of each partition: reading the
# commits for each such wait blocked the loop up to ten times a second for nothing.
FLOOR_CHECK_S = 0.1
# With no event held, a label beyond the label watermark asks once it has waited this long: while
# events flow, later labels soon come on every partition (each question blocks the loop for a few
# ms: at 10 ms, publish -> prediction at 1,000 events/s was ~5 ms slower at p50).
LABEL_FLOOR_CHECK_S = 0.03
# With labels alone (no event held or scored lately: the HTTP-only loop, docs/serving.md) the
# learner has nothing else to do, and the question (two round trips: ingestion's commits on
# `labels`, then the ends) beats waiting for a later label on every other partition. Asked every
# 10 ms while it lets labels go (bench serving: the learner's latency per label p50 ~46 -> ~20 ms),
# less often (up to FLOOR_CHECK_S) while it does not: a label ingestion has not passed on can wait.
LABELS_ALONE_CHECK_S = 0.01
# The role figures (accuracy, log loss, the drift error rate) go to Prometheus at most this often
# (the tick comes at least every poll_timeout_s, so the last change is out soon after): live
# batches come every few ms, and exporting after each one cost ~5% of the learner's CPU at 1,000
# events/s. A scrape comes every few seconds.
EXPORT_EVERY_S = 0.1
POLL_TIMEOUT_S = 0.05  # the longest the loop waits for input (shorter while labels alone wait)
AHEAD_LOG_S = 10.0  # labels learned ahead of event time are said in the log at most this often


class Tally:
    """A count said at most every `period_s`: `add` returns what to say now (all since the last
    time), or 0 to keep counting.

        >>> t = Tally(10.0)
        >>> t.add(1, now=0.0), t.add(2, now=5.0), t.add(1, now=10.0)
        (1, 0, 3)
    """

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.said_at = -math.inf
        self.unsaid = 0

    def add(self, n: int, now: float) -> int:
        self.unsaid += n
        if now - self.said_at < self.period_s:
            return 0
        said, self.said_at, self.unsaid = self.unsaid, now, 0
        return said


class LearnerWorker(StreamWorker):
    service = SERVICE
    batch_size = 1000

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, commits=CheckpointCommits())  # the checkpoint is the commit
        self.cfg = settings.learner
        self.name = self.cfg.model_name
        self.keys = Keys(settings.namespace)
        self.codec = get_codec()
        self.r = deps.redis_client(settings)  # waits out a Redis outage
        self.signing_key = settings.model_key.get_secret_value().encode()
        self.registry = ModelRegistry(self.r, self.keys, self.name, self.signing_key)
        self.telemetry = Telemetry(self.name)
        self.out = Outputs(self.producer, self.topics, self.name, self.telemetry)
        self.lineage = Lineage(self.registry, self.cfg, self.publish_swap, self.telemetry,
                               flush=self.publish_learned)
        self.lease = Lease(self.r, self.keys.lease(self.name), self.cfg.lease_ttl_s)
        self.snapshots = Snapshots(self.r, self.keys, settings.features.snapshot_ttl_s, SERVICE)
        self.hold_s = settings.features.max_reorder_wait_ms / 1000
        self.inputs = Inputs(settings, self.topics)
        self.state, self.loop = "standby", None
        self.learned_ahead = Tally(AHEAD_LOG_S)  # say_ahead
        self.scored_ahead = Tally(AHEAD_LOG_S)  # say_scored_ahead
        self.reset_session()

    @property
    def roles(self) -> Roles | None:
        return self.loop.roles if self.loop is not None else None

    def reset_session(self, state: LearnerState | None = None) -> None:
        """Everything a checkpoint holds (from `state`), plus what only this run keeps (not checkpointed)."""
        self.loop: Adaptation | None = None
        self.out.forget()
        if state is not None:
            examples = state.examples
            if examples is None:  # a checkpoint from before the buffer was in it
                examples = ExampleBuffer.from_redis_list(self.r, self.keys.example_buffer(self.name),
                                                         self.cfg.warm_start, state.position).rows()
            self.loop = self.adaptation(state.roles, {**(state.adaptation or {}), "examples": examples})
        self.offsets: dict[tuple[str, int], int] = state.offsets if state else {}
        self.position = state.position if state else 0  # champion labels learned so far
        self.join = DelayedJoin(self.hold_s, max(5 * self.hold_s, self.cfg.label_grace_s / 3), self.cfg.label_grace_s,
                                state.waiting if state else (), state.clock if state else float("-inf"))
        self.held = HeldEvents(state.held_events if state else ())
        self.flow = FlowControl(self.cfg.max_held_events, self.cfg.max_waiting_labels)
        # The same rule for the features partitions: one that stops at its end holds events back at
        # its latest ts until it has been idle for label_idle_s, or nothing is left upstream.
        self.feature_marks = LabelWatermark(self.cfg.label_idle_s, empty_is_idle=True)
        self.held_control: list[Control] = state.held_control if state else []
        self.watermark = LabelWatermark(self.cfg.label_idle_s, state.label_ts_by_partition if state else None)
        # ("features" | "labels", partition) -> (offset, ts): from `offset` on, nothing older than ts
        # comes there (Inputs.upstream_floors). What holds only now is read_floors' answer.
        self.floors: dict[tuple[str, int], tuple[int, float]] = {}
        self.floors_read_at = 0.0
        self.label_floor_check_s = LABELS_ALONE_CHECK_S  # labels alone: how often to ask (floor_check_s)
        self.out_of_order = 0  # labels learned after a later one since the lease was taken (logged, first few)
        self.replay = Replay()  # after a crash: labels to re-learn first, outcomes not to publish again
        self.next_retry = 0.0
        self.exported_at, self.figures_changed = 0.0, False
        self.dirty = self.checkpoint_now = False
        self.since_checkpoint = self.since_update = 0
        self.last_checkpoint = self.last_update = time.monotonic()
        self.update_pacer = UpdatePacer.from_settings(self.cfg)
        self.pipe = None
        self.new_predictions: list[tuple[str, dict[str, bytes], int]] = []  # scored in this batch, for Redis

    def adaptation(self, roles: Roles, state: dict | None = None) -> Adaptation:
        """The drift loop over these roles (adaptation.py), numbering challengers in the registry."""
        return Adaptation(roles, self.cfg, self.settings.drift, self.name, self.lineage, state)

    # -- the session: standby until the lease is ours, then the base loop until it is not -----
    def run(self) -> None:
        while not self._stop.is_set():
            if not self.lease.try_acquire():
                self._stop.wait(min(1.0, self.cfg.lease_ttl_s / 4))
                continue
            log.info("learner %s: lease taken, active", self.name)
            try:
                super().run()
            except BaseException:
                self.lease.release()  # let a standby try; this process reports the error on /health
                raise
            finally:
                self.state = "standby"
                self.inputs.close_control()

    def running(self) -> bool:
        return super().running() and not self.lease.lost.is_set()

    def open_consumer(self):
        """Restore the checkpoint and take up its positions; a broker away (at start, or whenever
        the loop starts over) is waited for with backoff, as Redis is, instead of ending the worker."""
        delays, told = deps.backoff_delays(), False
        while True:
            try:
                self.restore()
                consumer = self.inputs.open(self.offsets)
                break
            except (KafkaException, TimeoutError) as exc:  # TimeoutError: the outcomes since the checkpoint
                self.inputs.close_all()
                deps.DEPS.down("kafka", f"the learner cannot open its partitions: {exc}")
                if not told:
                    log.warning("learner %s: Kafka cannot be reached (%s); waiting for it", self.name, exc)
                    told = True
                if self._stop.wait(next(delays)):
                    raise RestartLoop("stopped while waiting for Kafka") from None
        if told:
            log.warning("learner %s: Kafka is back; learning resumes", self.name)
        self.read_floors()  # now, not when the first events wait: it connects to the upstream groups' coordinators
        self.state = "active"
        return consumer

    def next_batch(self) -> list[Message]:
        return self.inputs.next_batch(self.batch_size, self.poll_timeout_s)

    def close(self) -> None:
        if self.lease.lost.is_set():
            log.error("learner %s: lease lost; stopping without a checkpoint", self.name)
        else:
            self.checkpoint(force=True)
            self.lease.release()

    # -- a batch ---------------------------------------------------------------------------------
    def handle(self, messages: list[Message]) -> None:
        now = time.time()
        events, labels = [], []
        for m in messages:
            record = self.read(m, now)
            if record is not None:
                {Event: events, Label: labels, Control: self.held_control}[type(record)].append(record)
        if events:
            self.watermark.saw_features(now)
            self.feature_marks.saw_features(now)  # a partition still empty gets idle_s from the stream's start
            self.feature_marks.saw_labels(((e.partition, e.ts) for e in events), now)
        self.watermark.saw_labels(((lb.partition, lb.ts) for lb in labels), now)
        self.join.add(labels)
        firsts = self.join.first_copies(events, self.held.ids())
        if len(firsts) < len(events):
            metrics.DUPLICATES.labels(SERVICE, "features").inc(len(events) - len(firsts))
        self.held.add(firsts)
        self.pipe = self.r.pipeline(transaction=False)
        if self.replay:
            self.catch_up()
        if not self.replay:
            self.apply_control()  # first: a retrain request read now must not wait for the batch's examples
            now = time.time()
            feature_ends = self.inputs.feature_ends(self.offsets)
            label_mark, mark = self.marks(feature_ends, now)
            if self.waits_on_upstream(mark, label_mark, now) and time.monotonic() - self.floors_read_at >= self.floor_check_s:
                # Held back for a while: how far have the services before us got? (With labels
                # alone, only how far the labels have got matters.)
                before = label_mark
                alone = self.labels_alone
                label_mark, mark = self.marks(feature_ends, now,
                                              self.read_floors(("labels",) if alone else ("labels", "features")))
                if alone:
                    self.labels_asked(moved=label_mark > before)
            self.join.label_mark = label_mark
            known = self.inputs.drained_ends("features", self.inputs.feature_partitions) \
                if self.held and mark < min(label_mark, self.held.events[0].ts) else None
            if known is not None:
                # Nothing left upstream: a features partition read to its (fresh) end is done,
                # what it gets next is newer.
                mark = min(label_mark, features_mark(self.feature_marks.ts_by_partition,
                                                     self.inputs.feature_ends(self.offsets, fresh=True, known=known)))
            # A chunk at a time, control read between chunks: behind a backlog thousands of held
            # events can be released at once, and a retrain request must not wait for all of them.
            while True:
                chunk = self.held.release(mark, limit=self.batch_size)
                self.step(chunk, all(end for _, end in feature_ends))
                if len(chunk) < self.batch_size:
                    break
                self.between_chunks()
                if self.read_control():
                    self.apply_control()
            if not all(end for _, end in feature_ends):
                now = time.time()  # after the walk: it may have taken seconds
                self.watermark.features_pending(now)
                self.feature_marks.features_pending(now)
            # Bounded memory without leaving order: the partitions running ahead of the mark wait.
            self.inputs.pause_only(self.flow.decide(len(self.held), len(self.join.waiting),
                                                    self.feature_marks.ts_by_partition,
                                                    self.watermark.ts_by_partition, mark))
        self.flush_batch()

    @property
    def labels_alone(self) -> bool:
        """No event held and none scored for FLOOR_CHECK_S: labels are all there is to do (the
        HTTP-only loop, a stream's end), so they may ask how far the labels have got sooner. While
        events flow, a label beyond the watermark soon has later ones on every partition, and
        questions every 10 ms would only slow the loop (LABEL_FLOOR_CHECK_S)."""
        return not self.held and time.time() - self.join.last_feature_at >= FLOOR_CHECK_S

    @property
    def floor_check_s(self) -> float:
        """How often the services before us are asked how far they have got: with labels alone
        from LABELS_ALONE_CHECK_S up to FLOOR_CHECK_S."""
        return self.label_floor_check_s if self.labels_alone else FLOOR_CHECK_S

    def labels_asked(self, moved: bool) -> None:
        """Labels alone asked how far the labels have got: ask as often again while the answers
        let labels go, half as often each time they do not (a label ingestion has not passed on
        can wait long: no broker questions every 10 ms meanwhile).

            >>> worker = LearnerWorker.__new__(LearnerWorker)
            >>> worker.label_floor_check_s = LABELS_ALONE_CHECK_S
            >>> for _ in range(5):
            ...     worker.labels_asked(moved=False)
            >>> worker.label_floor_check_s == FLOOR_CHECK_S
            True
            >>> worker.labels_asked(moved=True)
            >>> worker.label_floor_check_s == LABELS_ALONE_CHECK_S
            True
        """
        self.label_floor_check_s = LABELS_ALONE_CHECK_S if moved else min(2 * self.label_floor_check_s, FLOOR_CHECK_S)

    @property
    def poll_timeout_s(self) -> float:
        """While labels alone wait beyond the watermark, the loop comes back when they may ask
        again, not a whole poll later."""
        if self.labels_alone and self.join.first_after(self.join.label_mark) is not None:
            return min(self.label_floor_check_s, POLL_TIMEOUT_S)
        return POLL_TIMEOUT_S

    def waits_on_upstream(self, mark: float, label_mark: float, now: float) -> bool:
        """An event held back for FLOOR_CHECK_S, or (none held) a label beyond the label watermark
        for LABEL_FLOOR_CHECK_S (LABELS_ALONE_CHECK_S with labels alone): a stream's end, whose last
        labels wait for it, or labels arriving only over HTTP, each waiting for a later one on
        every other labels.valid partition.

        (It asked of the newest label: in a steady stream of labels that is never old, and each
        waited for the others' next ones, ~60 ms at 200 labels/s over 6 partitions.)"""
        if self.held:
            return mark < self.held.events[0].ts and now - self.held.events[0].seen >= FLOOR_CHECK_S
        first = self.join.first_after(label_mark)
        return first is not None and now - first.seen >= (
            LABELS_ALONE_CHECK_S if self.labels_alone else LABEL_FLOOR_CHECK_S)

    def marks(self, feature_ends: list[tuple[int, bool]], now: float,
              floors_now: dict[tuple[str, int], tuple[int, float]] | None = None) -> tuple[float, float]:
        """(the labels' watermark, where events are released: the least of it and the features');
        `floors_now`: read_floors' answer, true at this moment only."""
        newest_held = self.held.events[-1].ts if self.held else INF
        floors_now = floors_now or {}
        label_mark = self.watermark.mark(self.inputs.label_ends(self.offsets), now, self.labels_drained,
                                         self.floor_of("labels", self.topics.labels_valid, floors_now), newest_held)
        return label_mark, min(label_mark, self.feature_marks.mark(
            feature_ends, now, self.features_drained, self.floor_of("features", self.topics.features, floors_now),
            newest_held))

    def read_floors(self, sides: tuple[str, ...] = ("labels", "features")) -> dict[tuple[str, int], tuple[int, float]]:
        """Keep the lasting floors the upstream commits give; return those that hold only now."""
        self.floors_read_at = time.monotonic()
        floors_now = {}
        for key, (offset, lasting, at_once) in (self.inputs.upstream_floors(sides) or {}).items():
            if lasting != INF and lasting > self.floors.get(key, (0, -INF))[1]:
                self.floors[key] = (offset, lasting)
            floors_now[key] = (offset, at_once)
        return floors_now

    def floor_of(self, side: str, topic: str, floors_now: dict[tuple[str, int], tuple[int, float]]):
        """partition -> the event time below which nothing more comes to it (ordering.LabelWatermark.mark)."""
        def floor(partition: int) -> float:
            read, best = self.offsets.get((topic, partition), 0), -INF
            for offset, ts in (self.floors.get((side, partition), (None, -INF)),
                               floors_now.get((side, partition), (None, -INF))):
                if offset is not None and read >= offset:  # read all that was there when it was said
                    # A record to come may have that very time: not quite up to it.
                    best = max(best, ts if ts == INF else math.nextafter(ts, -INF))
            return best
        return floor

    def read_control(self, timeout: float = 0) -> bool:
        """Control messages that came meanwhile (retrain requests, swaps), decoded and kept for
        apply_control; True if there are any."""
        now = time.time()
        for m in self.inputs.control.consume(num_messages=100, timeout=timeout):
            record = self.read(m, now) if m.error() is None else None
            if record is not None:
                self.held_control.append(record)
        return bool(self.held_control)

    def read(self, m: Message, now: float) -> Event | Label | Control | None:
        """One message's record, its offset taken; None if it was read already (a fetch repeated
        around a pause/resume: never twice) or does not decode (dead-lettered)."""
        where = (m.topic(), m.partition())
        if m.offset() < self.offsets.get(where, 0):
            return None
        self.offsets[where] = m.offset() + 1
        self.dirty = True
        if m.topic() == self.topics.retrain_requests and (ORIGIN_HEADER, SERVICE.encode()) in (m.headers() or ()):
            return None  # one of ours: acted on where it was decided
        try:
            return decode(self.codec, base_topic(m.topic()), m.topic(), m.partition(), m.offset(), m.key(),
                          m.value(), now)
        except DecodeError as exc:
            self.undecodable(m, exc)
            return None

    def apply_control(self) -> None:
        """Retrain requests from outside the stream (demand, schedule, a candidate trained offline)
        and champion changes made elsewhere (an operator's rollback or promotion), at this position.
        The requests this learner published itself were acted on when it made them."""
        control, self.held_control = self.held_control, []
        for c in control:
            if c.value.get("model") != self.name:
                continue
            if c.kind == "retrain":
                self.record(self.loop.request(c.value, self.position), from_outside=True)
            else:
                new = self.lineage.follow(self.roles, c.value, self.position)
                if new is not None:
                    self.loop.followed(new)
                    self.out.update(new)  # its artifact from this position: replicas follow it from here
                    self.checkpoint_now = True
                    self.lineage.prune(self.roles)

    def record(self, changes: list[Change], from_outside: bool = False) -> None:
        """What the drift loop decided: published (drift.events, retrain.requests) and written
        down in the registry (lineage.py, which also publishes model.swaps).

        A role change the stream decided is not checkpointed at once: after a crash, the replay
        since the last checkpoint takes the same decision at the same position, and the registry
        side is idempotent (lineage.py: the version of a request is kept, a promotion made already
        is not published again, nor is a retrain request or a drift event (`Replay`). One that came from
        outside the stream (a retrain request read from `retrain.requests`) is checkpointed at
        once: the replay would take it at whatever position it reads it again. (A checkpoint per
        change cost ~7% of `serve all`'s throughput on raw Elec2, where the loop changes roles
        every second or so: each flushes the producer, asks the broker where outcomes end and
        pickles the thousands of labels waiting behind a backlog.)"""
        for change in changes:
            if change.kind == "alarm":
                if not self.replay.alarmed(change.record["drift_id"]):
                    self.out.drift_event(change.record)
            elif change.kind == "request":
                if not self.replay.requested(change.record["request_id"]):
                    self.out.retrain_request(change.record)
            elif change.kind == "suppressed":
                metrics.RETRAINS_SUPPRESSED.labels(self.name, change.record["reason"]).inc()
            elif self.lineage.record(change):
                self.lineage.prune(self.roles)
                self.checkpoint_now |= from_outside

    def step(self, events: list[Event], features_at_end: bool) -> None:
        """Score `events` (ts order), learning before each the labels due before it (join.py)."""
        now, held = time.time(), self.held.ids()
        self.join.current = self.pipeline_current(now, features_at_end)
        due = self.join.due(events, held, now)
        if self.join.ahead:
            self.say_ahead(now, self.join.ahead, due)
        if not due and not events:
            return
        stored = self.snapshots.fetch([e.event_id for e in events if self.inputs.maybe_scored(e)],
                                      [lb.event_id for lb in self.join.to_look_up(due, now, events)])
        learned: set[int] = set()
        for item in self.join.plan(events, due):
            if isinstance(item, Event):
                self.score(item, stored.get(item.event_id) or Snapshot())
            elif self.learn(item, stored):
                learned.add(id(item))
        self.join.settle(due, learned, stored, now)
        for lb in self.join.expire(now, held):
            self.out.dead_letter(lb.raw, lb.key, lb.partition, lb.offset, "unknown_event",
                             f"no feature snapshot for event {lb.event_id!r} after {self.cfg.label_grace_s:g}s: the "
                             f"event is unknown, or its snapshot expired "
                             f"(snapshot_ttl_s={self.settings.features.snapshot_ttl_s})")

    def say_scored_ahead(self, event: Event) -> None:
        """An event scored after a label that follows it: said at once, then at most every
        AHEAD_LOG_S with how many came meanwhile (a replay run again over the same event times
        scores every event so: one line each would bury the log)."""
        n = self.scored_ahead.add(1, time.monotonic())
        if n:
            log.error("learner %s: event %s (ts %s) scored after learning a label of ts %s (%d such events since "
                      "the last line like this)", self.name, event.event_id, event.ts, self.join.learned_ts, n)

    def say_ahead(self, now: float, n: int, due: list[Label]) -> None:
        """Labels learned before event time reached them: the end of a stream (nothing else can be),
        a label clock running ahead, or one overdue. Said in the log at most every AHEAD_LOG_S, as
        what an event scored later after such a label would have known too early comes from here."""
        n = self.learned_ahead.add(n, now)
        if n:
            log.info("learner %s: %d labels learned before event time reached them (latest ts %.3f, events scored "
                     "up to ts %.3f, features quiet for %.2fs, nothing on its way)", self.name, n,
                     max(lb.ts for lb in due), self.join.clock, now - self.join.last_feature_at)

    def pipeline_current(self, now: float, features_at_end: bool) -> bool:
        """Nothing on its way to us (join.py's `current`): asked of the broker only when a label
        has waited long enough for the answer to matter."""
        if not features_at_end:
            return False
        clock, hold, grace = self.join.clock, self.hold_s, self.cfg.label_grace_s
        # An early release needs no events held (join.due), so while some are held only an overdue
        # label waits on the answer. (Asked at every step behind a backlog read into memory, these
        # broker questions once took half the learner's time.)
        early = not self.held
        if now - self.join.waiting_since < (min(grace, hold) if early else grace):
            return True  # no label has waited long enough to need the answer (no scan)
        if not any(now - lb.seen >= grace or (early and now - lb.seen >= hold and lb.ts > clock)
                   for lb in self.join.waiting):
            return True  # no label waits on the answer
        return self.nothing_on_the_way()

    def labels_drained(self, partition: int) -> bool:
        """Ingestion has read every label published, and we have read all it wrote to `partition`."""
        return self.read_to_end("labels", partition)

    def features_drained(self, partition: int) -> bool:
        """Ingestion and features have read everything published, and we all they wrote to `partition`."""
        return self.read_to_end("features", partition)

    def read_to_end(self, side: str, partition: int | None = None) -> bool:
        """The services before us have read everything published, and we have read `partition`
        of theirs (None: every one) to its end by the broker's count now, not the consumer's
        cached one (one question: `Inputs.drained_ends`)."""
        ours = [tp for tp in self.inputs.partitions(side) if partition is None or tp.partition == partition]
        known = self.inputs.drained_ends(side, ours)
        return known is not None and all(
            end for _, end in self.inputs.ends(ours, self.offsets, fresh=True, side=side, known=known))

    def nothing_on_the_way(self) -> bool:
        """Ingestion and features have read everything published, and we have read all they wrote
        (watermarks asked of the broker, not the consumer's cached ones)."""
        return self.read_to_end("features")

    def catch_up(self) -> None:
        """After a crash: re-learn the labels whose outcomes were already published, in that order."""
        ready = self.replay.ready(self.join.waiting)
        if not ready:
            return
        stored = self.snapshots.fetch((), [lb.event_id for lb in ready if lb.event_id not in self.join.recent])
        learned = set()
        for lb in ready:
            if not self.learn(lb, stored):
                break
            learned.add(id(lb))
            self.replay.learned()
        self.join.settle([], learned, (), time.time())
        if not self.replay:
            log.info("learner %s: caught up after restart at position %d", self.name, self.position)

    def score(self, event: Event, stored: Snapshot) -> None:
        """Each model's prediction for one event, kept in memory for its label; one stored before a
        crash (made at event time) is kept and not published again."""
        fv = event.vector
        # Answers stored before a crash were made at event time by the roles of that time: they
        # are the event's answers, as they were, and no role that came later answers it now.
        answers = dict(stored.predictions)
        if not answers and (self.join.learned_ts > event.ts or self.join.learned_before_event(event.event_id)):
            # Never expected: the model knows a label from this event's future (its own or later).
            metrics.SCORED_AHEAD.labels(self.name).inc()
            self.say_scored_ahead(event)
        if fv.get("published_ms"):
            metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - fv["published_ms"] / 1000))
        blobs = {}
        for slot in () if answers else self.roles.every_slot():
            # Kept in the snapshot for every role (after a crash its contest still has it); the
            # displaced champion's answer is not published: it answers only to its contest.
            answers[slot.role], blobs[slot.role] = self.out.prediction(event, slot.role, slot.version,
                                                                       *slot.score(fv["features"]),
                                                                       publish=slot.role in PUBLISHED)
            answers[slot.role]["known"] = self.position  # labels learned when scored (in the outcome)
        if blobs:
            self.new_predictions.append((event.event_id, blobs, self.position))  # into Redis with the batch
        self.join.scored(event, Snapshot(fv, answers))
        self.record(self.loop.saw(fv["features"]))

    def learn(self, label: Label, stored: dict[str, Snapshot]) -> bool:
        """Join a label with its event, emit outcomes, learn once. False = not ready (keeps waiting)."""
        snap = self.join.snapshot_for(label, stored, time.time())
        if snap is None:
            return False  # the event is still on its way through features (or to our scoring)
        if self.join.learned_before(label):
            metrics.DUPLICATES.labels(SERVICE, "labels.valid").inc()
            return True
        x = snap.vector["features"]
        regression = is_regressor(self.roles.champion.model)
        problem = label_problem(self.roles.champion.model, label.label, self.roles.classes, self.cfg.max_classes)
        if problem:  # text for a regressor, "yes" for a binary classifier: nothing any role could learn
            self.join.learn(label)
            self.out.dead_letter(label.raw, label.key, label.partition, label.offset, *problem)
            return True
        step = self.loop.learn(x, label.label, snap.predictions, self.position)
        for role, p in step.learned.answers:
            if not self.replay.published(label.event_id, role):
                self.out.outcome(snap.vector, label, p, role, self.position, regression)
        for slot in self.roles.slots():
            self.telemetry.count("learned", slot.role)
        learned_ts, clock = self.join.learned_ts, self.join.clock
        if self.join.learn(label, snap.vector.get("ts")):
            metrics.LABELS_OUT_OF_ORDER.labels(self.name).inc()
            self.out_of_order += 1
            if self.out_of_order <= 5 or self.out_of_order % 1000 == 0:  # enough to tell which, not a flood
                log.warning("learner %s: label of %s (ts %.3f, labels.valid %d@%d) learned after a label of ts %.3f "
                            "and an event of ts %.3f (%d so far): learning order left the stream's", self.name,
                            label.event_id, label.ts, label.partition, label.offset, learned_ts, clock,
                            self.out_of_order)
        self.position += 1
        self.since_checkpoint += 1
        self.since_update += 1
        self.dirty = True
        self.record(step.changes)
        return True

    def undecodable(self, m: Message, exc: DecodeError) -> None:
        if m.topic() == self.topics.labels_valid:
            self.out.dead_letter(m.value(), m.key(), m.partition(), m.offset(), exc.reason, exc.detail)
        else:  # upstream services wrote it; there is no DLQ of theirs to put it in
            log.error("learner: undecodable %s message at %s/%s: %s", m.topic(), m.partition(), m.offset(), exc)
            metrics.DEAD_LETTERS.labels(SERVICE, base_topic(m.topic()), exc.reason).inc()

    def flush_batch(self) -> None:
        self.store_scored()
        self.pipe = None
        self.out.release()  # now that the snapshots they come from are stored
        self.figures_changed = True  # exported by the tick (export_figures)

    def export_figures(self, now: float) -> None:
        self.telemetry.export(self.roles, self.loop.policy.error_rate if self.loop else None)
        self.exported_at, self.figures_changed = now, False

    def store_scored(self) -> None:
        """What the batch has written so far into Redis, with the snapshots of the events scored."""
        self.snapshots.queue_predictions_if_present(self.pipe, self.new_predictions, keep_existing=True)
        self.new_predictions = []
        started = time.perf_counter()
        self.pipe.execute()
        metrics.REDIS_SECONDS.labels(SERVICE, "write").observe(time.perf_counter() - started)

    def publish_learned(self) -> None:
        """Before an artifact is saved (lineage.py): every outcome learned so far in Kafka, so
        first the snapshots they were learned from in Redis (mid-batch: a promotion, a snapshot)."""
        if self.pipe is not None:
            self.store_scored()
            self.pipe = self.r.pipeline(transaction=False)
        self.out.release()
        self.producer.flush(10)

    def between_chunks(self) -> None:
        """Behind a backlog one batch can release the whole stream: what it scored is stored and
        published chunk by chunk, and checkpoints are taken as if each chunk were a batch (a crash
        then re-learns one interval, not the backlog)."""
        self.flush_batch()
        if self.checkpoint_due(time.monotonic()):
            self.checkpoint()
        self.pipe = self.r.pipeline(transaction=False)

    def tick(self) -> None:
        now = time.monotonic()
        if (self.join.waiting or self.held) and not self.replay and now >= self.next_retry:
            # labels past their hold, events whose labels are all in; labels alone beyond the
            # watermark as soon as they may ask again (poll_timeout_s)
            self.next_retry = now + self.poll_timeout_s
            self.handle([])
        if self.replay and now > self.replay.deadline:
            log.error("learner %s: %d published outcomes never came back to be re-learned; giving up the "
                      "ordered replay (their labels will be learned as they come)", self.name, len(self.replay))
            self.replay.give_up()
            self.handle([])
        if not self.replay and self.update_pacer.due(self.since_update, now):  # snapshots for serving (updates.py)
            self.update_pacer.publish(self.publish_update)
        if self.checkpoint_due(now):
            self.checkpoint()
        self.telemetry.flush_counts()  # after every batch and idle poll (the loop's tick)
        if self.figures_changed and now - self.exported_at >= EXPORT_EVERY_S:
            self.export_figures(now)
        self.producer.poll(0)

    # -- registry, model.updates, model.swaps ------------------------------------------------------
    def publish_update(self) -> None:
        """A snapshot of each public role for serving, at this position (updates.py; the outcomes
        before it go to Kafka first, lineage.py)."""
        offsets = {f"{self.topics.base(t)}/{p}": o for (t, p), o in sorted(self.offsets.items())}
        for slot in self.roles.slots():
            slot.revision = self.lineage.save(slot, self.position, offsets=offsets)
            self.out.update(slot)
        self.since_update = 0
        self.last_update = time.monotonic()

    def publish_swap(self, from_version: int | None, to_version: int, reason: str) -> None:
        self.out.swap(from_version, to_version, reason, self.position)

    # -- checkpoint and restore --------------------------------------------------------------------
    def checkpoint_due(self, now: float) -> bool:
        return self.checkpoint_now or self.since_checkpoint >= self.cfg.checkpoint_every or (
            self.dirty and now - self.last_checkpoint >= self.cfg.checkpoint_interval_s)

    def checkpoint(self, force: bool = False) -> bool:
        if self.replay or self.roles is None:
            return False  # mid-recovery: offsets are ahead of what has been applied
        if not (force or self.dirty or self.checkpoint_now):
            return False
        if deps.DEPS.is_down("kafka") and not force:
            return False  # it cannot acknowledge our outputs nor say where outcomes end: after the outage
        if self.producer.flush(30) > 0:
            log.error("learner %s: producer did not flush; checkpoint postponed", self.name)
            return False
        try:
            outcomes_end = high_watermark(self.consumer, self.topics.outcomes)
            drift_events_end = high_watermark(self.consumer, self.topics.drift_events)
        except KafkaException as exc:  # the broker went away meanwhile: the next tick tries again
            log.warning("learner %s: checkpoint postponed, the ends of outcomes and drift.events are unknown (%s)",
                        self.name, exc)
            return False
        loop = self.loop.state()
        state = LearnerState(self.cfg.model, self.roles, dict(self.offsets),
                             outcomes_end, self.join.waiting, self.position,
                             self.join.clock, self.held.events, self.held_control, self.watermark.ts_by_partition,
                             loop.pop("examples"), adaptation=loop, drift_events_offset=drift_events_end)
        if not save_checkpoint(self.r, self.keys, self.name, self.lease, state, self.signing_key):
            log.error("learner %s: lease lost; checkpoint refused", self.name)
            return False
        metrics.CHECKPOINTS.labels(self.name).inc()
        self.publish_drift_state()
        try:
            self.inputs.commit(self.offsets)
        except Exception:
            log.debug("offset commit for lag tools failed", exc_info=True)
        self.dirty = self.checkpoint_now = False
        self.since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        return True

    def restore(self) -> None:
        state = load_checkpoint(self.r, self.keys, self.name, self.signing_key)  # TamperedArtifact: refuse loudly
        self.reset_session(state)
        if state is None:
            self.loop = self.adaptation(Roles(self.lineage.first_champion()))
            self.checkpoint_now = True
            return
        # What was published since the checkpoint is not published again: outcomes, our own
        # retrain requests (read from the checkpoint's position in that topic), drift events.
        requests = self.topics.retrain_requests
        ours = records_since(self.settings, requests, state.offsets.get((requests, 0), 0), "RetrainRequest",
                             self.name, origin=(ORIGIN_HEADER, SERVICE.encode()))
        self.replay = Replay(
            outcomes_since(self.settings, self.topics.outcomes, state.outcomes_offset, self.name),
            deadline=time.monotonic() + self.cfg.label_grace_s + 30,
            requests={r["request_id"] for r in ours},
            alarms=set() if state.drift_events_offset is None else {
                d["drift_id"] for d in records_since(self.settings, self.topics.drift_events, state.drift_events_offset,
                                                     "DriftEvent", self.name)})
        challenger = self.roles.challenger
        log.info("learner %s: restored checkpoint at position %d (champion v%d, challenger %s); %d outcomes "
                 "published since will be re-learned without publishing them again", self.name, self.position,
                 self.roles.champion.version, f"v{challenger.version}" if challenger else "none", len(self.replay))
        self.telemetry.versions(self.roles)

    def publish_drift_state(self) -> None:
        """What the drift service's /v1/drift and `driftline retrain` show: the policy's view, at
        each checkpoint (best effort: the checkpoint itself is what matters)."""
        policy = self.loop.policy
        try:
            self.r.hset(self.keys.drift_state(self.name), mapping={
                "position": self.position, "version": policy.version or "",
                "last_retrain": "" if policy.last_retrain is None else policy.last_retrain,
                "error_rate": policy.error_rate, "rolling_accuracy": "" if policy.rolling_accuracy is None
                else policy.rolling_accuracy, "cooling_down": int(policy.cooling_down())})
        except redis.RedisError:
            log.debug("could not publish the drift state", exc_info=True)

    # -- introspection ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {**super().health(), **self.status()}

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "model": self.name, "position": self.position,
                "waiting_labels": len(self.join.waiting), "held_events": len(self.held), **Roles.describe(self.roles)}
