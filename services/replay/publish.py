"""`replay()`: publish a dataset as events plus delayed labels through Kafka, wait until the
running pipeline has accounted for every label (collect.py), and write the report; a stall is
diagnosed (diagnose.py).

    report = replay(settings, load("elec2"), limit=5000, label_delay=100, report_dir=Path("reports/x"))
    report["prequential"]["accuracy"]

The replay talks to the pipeline only through its public doors: Avro `Event`s on `events`
(key = entity id) and `Label`s on `labels` (key = event id), exactly what a producer would send.
It then reads the pipeline's answers: `outcomes` (role champion), `events.dlq`, `labels.dlq`,
`events.valid` (to count valid events), `drift.events` and `model.swaps`, from the offsets they
had when the replay began. It never reads or writes a service's state, and it never starts one.

Ids: event i of a replay is `<run id>-<i>` and its entity `<run id>/<entity>`, so that replays into
one namespace never share entity state or collide in ingestion's de-duplication.

Time: event i has ts = START + i seconds (a `timed` dataset's rows carry their own: START + their
offset); the label of event i is published right after event i+N (N = label delay) with ts =
ts(i+N) + 1 ms (less when the next event is closer), so the features service's ordered merge
applies it after event i+N's vector and before event i+N+1's.

Fields that name other entities (`Dataset.keys`: a merchant) get the run id as their entity ids do.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..shared import kafka
from ..shared.codec import get_codec
from ..shared.settings import Settings
from ..shared.topics import Topics
from .collect import Collector
from .datasets import Dataset
from .diagnose import check_pipeline, diagnose

START_TS = 1_700_000_000.0  # a fixed past instant: reports and features are reproducible
STEP_S = 1.0
LABEL_EPSILON_S = 1e-3
# A published message waits this long for a broker that is away before it counts as undeliverable
# (librdkafka's own default, made explicit): the replay rides out an outage as the services do.
DELIVERY_TIMEOUT_S = 300.0
log = logging.getLogger(__name__)


class ReplayStalled(RuntimeError):
    """The pipeline stopped accounting for labels before every one came back; the message says
    what is missing and which service looks stuck."""


def event_ts(i: int) -> float:
    return START_TS + i * STEP_S


def label_ts(i: int, delay: int) -> float:
    return event_ts(i + delay) + LABEL_EPSILON_S


def schedule(n: int, delay: int) -> Iterator[tuple[str, int]]:
    """The publication order: ("event", i) then, right after event i+delay, ("label", i); the
    labels of the last `delay` events follow the last event.

    >>> list(schedule(3, 1))
    [('event', 0), ('event', 1), ('label', 0), ('event', 2), ('label', 1), ('label', 2)]
    """
    for i in range(n):
        yield "event", i
        if i - delay >= 0:
            yield "label", i - delay
    for j in range(max(n - delay, 0), n):
        yield "label", j


def labels_before(i: int, delay: int) -> int:
    """How many labels `schedule` publishes before event i: what a model that learns in the
    stream's order knows when it scores it (an outcome's `known`).

    >>> order = list(schedule(4, 1))
    >>> [labels_before(i, 1) for i in range(4)] == [sum(k == "label" for k, _ in order[:order.index(("event", i))])
    ...                                              for i in range(4)]
    True
    """
    return max(0, i - delay)


class RateLimiter:
    """At most `rate` events per second on average (0 = as fast as it goes)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.monotonic()

    def wait(self, i: int) -> None:
        if self.rate <= 0:
            return
        ahead = self.t0 + i / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def replay(
    settings: Settings,
    dataset: Dataset,
    *,
    limit: int | None = None,
    rate: float = 0.0,
    label_delay: int = 0,
    model: str | None = None,
    features: str | None = None,
    report_dir: Path | None = Path("reports/replay"),
    stall_timeout_s: float = 60.0,
    progress: bool = True,
    console=None,
    keep_outcomes: bool = False,
) -> dict[str, Any]:
    """Publish, wait for every label to be accounted for, build (and write) the report.
    With `keep_outcomes`, `report["_outcomes"]` holds the champion outcomes as they came
    (tests use it to prove nothing was learned twice), `report["_learned_at_s"]` when each
    came, in seconds after the first event was published (the bench's timeline), and
    `report["_acks"]` the order in which Kafka acknowledged the events and labels, ("event" |
    "label", row) each: the order they reached the broker, which a producer's per-partition
    batches can make differ from the order they were sent in (`replay.order.check`). None of them
    is written to report.json.

    Raises ReplayStalled when nothing new comes back for `stall_timeout_s` seconds while labels
    are still missing."""
    from rich.console import Console

    from .plot import plot_report
    from .report import build_report, summary_table, write_report

    console = console or Console(stderr=True)
    if label_delay < 0:
        raise ValueError("--label-delay must be >= 0")
    kafka.ensure_topics(settings)
    run_id = uuid.uuid4().hex[:8]
    rows = list(_take(dataset.rows(), limit))
    n = len(rows)
    expected_model = model or settings.learner.model
    expected_features = features or settings.features.set

    collector = Collector(settings, f"{run_id}-", f"{run_id}/")
    collector.start()
    try:
        with _progress(console, progress) as bar:
            sent_task = bar.add_task("publish", total=n)
            learned_task = bar.add_task("learned", total=n)
            acks: list[tuple[str, int]] | None = [] if keep_outcomes else None
            events_sent, labels_sent, t_first = _publish(settings, rows, run_id, label_delay, rate, collector, bar,
                                                         sent_task, learned_task, times=times_of(dataset, rows),
                                                         keys=dataset.keys, acks=acks)
            publish_s = time.time() - (t_first or time.time())
            with collector.lock:  # the stall clock starts when publishing ends
                collector.data.last_progress = max(collector.data.last_progress, time.monotonic())
            _wait_accounted(settings, collector, labels_sent, stall_timeout_s, bar, learned_task)
            # The learner publishes its drift events and swaps beside its outcomes: read those
            # topics up to where they end now, and the report has them all.
            collector.read_to_end([collector.topics.drift_events, collector.topics.model_swaps])
    finally:
        collector.stop()  # also on Ctrl-C: no thread left polling a broker that goes away
    collector.decode_outcomes()
    collector.count_valid()
    data = collector.data
    meta = {
        "dataset": dataset.name, "dataset_size": dataset.size, "drift_positions": list(dataset.drift_positions),
        "drift_width": dataset.drift_width, "events_sent": events_sent, "events_valid": len(data.events_valid),
        "events_valid_copies": data.events_valid_copies,
        "labels_sent": labels_sent, "label_delay": label_delay, "model_spec": expected_model,
        "features": expected_features, "rate": rate, "namespace": settings.namespace, "run_id": run_id,
        "t_first_published": t_first, "t_last_learned": data.last_learned_s, "publish_s": round(publish_s, 3),
        "started_at": t_first,
        "checks": check_pipeline(settings, expected_model, expected_features, data.outcomes, console),
    }
    # The report names what actually ran, when the registry knows it.
    if meta["checks"].get("model_matches") is False:
        meta["model_spec"] = meta["checks"]["learner_model"]
    report = build_report(meta, data.outcomes, drift=data.drift, swaps=data.swaps, events_dlq=data.events_dlq,
                          labels_dlq=data.labels_dlq, window=settings.learner.window)
    if report_dir is not None:
        path = write_report(report, report_dir)
        plot_report(report, Path(report_dir) / "report.png")
        report["_paths"] = {"json": str(path), "png": str(Path(report_dir) / "report.png")}
    if keep_outcomes:
        report["_outcomes"] = list(data.outcomes)
        report["_learned_at_s"] = [t - t_first for t in data.learned_at_s] if t_first is not None else []
        report["_acks"] = acks
    if progress:
        console.print(summary_table(report))
        if report_dir is not None:
            console.print(f"[green]wrote[/] {report['_paths']['json']} and {report['_paths']['png']}")
    return report


def times_of(dataset: Dataset, rows: list) -> list[float]:
    """Each row's event time: its own for a timed dataset, else one second apart.

    >>> from .datasets import Dataset
    >>> times_of(Dataset("t", list, 2, timed=True), [({}, "0", "a", 0.5), ({}, "1", "a", 2.0)])
    [1700000000.5, 1700000002.0]
    """
    if dataset.timed:
        return [START_TS + row[3] for row in rows]
    return [event_ts(i) for i in range(len(rows))]


def label_time(times: list[float], i: int, delay: int) -> float:
    """The label of event i: just after event i+delay (before the next one); past the last
    event, a second apart as if the stream went on.

    >>> round(label_time([0.0, 10.0, 10.0005], 0, 1), 6), label_time([0.0, 1.0], 1, 2)
    (10.00025, 3.001)
    """
    j = i + delay
    if j >= len(times):
        return times[-1] + (j - len(times) + 1) * STEP_S + LABEL_EPSILON_S
    gap = times[j + 1] - times[j] if j + 1 < len(times) else STEP_S
    return times[j] + min(LABEL_EPSILON_S, gap / 2 if gap > 0 else LABEL_EPSILON_S)


def _publish(settings: Settings, rows: list, run_id: str, label_delay: int, rate: float, collector: Collector,
             bar, sent_task, learned_task, times: list[float] | None = None,
             keys: tuple[str, ...] = (), acks: list[tuple[str, int]] | None = None) -> tuple[int, int, float | None]:
    """Events and labels in `schedule` order through the `events` and `labels` doors; `acks`, when
    given, gets ("event" | "label", row) of each as Kafka acknowledges it (one broker, one
    connection: the order the broker appended them in)."""
    times = times if times is not None else [event_ts(i) for i in range(len(rows))]
    topics = Topics(settings.namespace)
    codec = get_codec()
    producer = kafka.producer(settings, **{"message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000)})
    failed: list = []  # delivery errors (librdkafka gave up on a message)

    def delivered(err, _msg, kind: str = "", row: int = 0) -> None:
        if err is not None:
            failed.append(err)
        elif acks is not None:
            acks.append((kind, row))

    limiter = RateLimiter(rate)
    prefix = f"{run_id}-"
    # Encoded before the first is published: a producer's own work is not the pipeline's, and on
    # the pipeline's cores (a bench) it would take their CPU while they are measured.
    encode_task = bar.add_task("encode", total=len(rows))
    messages = []
    for kind, i in schedule(len(rows), label_delay):
        fields, label, entity = rows[i][:3]
        entity = f"{run_id}/{entity}"  # each replay's entities start with a fresh state
        if kind == "event":
            if keys:  # and so do the other entities its fields name
                fields = {k: f"{run_id}/{v}" if k in keys and isinstance(v, str) else v for k, v in fields.items()}
            messages.append((kind, i, topics.events, entity, codec.encode("Event", {
                "event_id": f"{prefix}{i}", "entity_id": entity, "ts": times[i], "fields": fields,
                "published_ms": None})))
            if i % 1000 == 0:
                bar.update(encode_task, completed=i)
        else:
            messages.append((kind, i, topics.labels, f"{prefix}{i}", codec.encode("Label", {
                "event_id": f"{prefix}{i}", "label": label, "ts": label_time(times, i, label_delay)})))
    bar.update(encode_task, completed=len(rows))
    # Held until sent, like the rows: out of the cyclic collector's sight, its full collections do
    # not walk them while the pipeline is measured (~0.25 s of 45,000 rows).
    gc.freeze()
    try:
        t_first = None
        events_sent = labels_sent = 0
        for kind, i, topic, key, value in messages:
            if kind == "event":
                limiter.wait(i)
                if t_first is None:
                    t_first = time.time()
            on_delivery = delivered if acks is None else functools.partial(delivered, kind=kind, row=i)
            kafka.produce(producer, topic, value, key=key, on_delivery=on_delivery)
            if kind == "event":
                events_sent += 1
            else:
                labels_sent += 1
            if (events_sent + labels_sent) % 500 == 0:
                producer.poll(0)
                bar.update(sent_task, completed=events_sent)
                bar.update(learned_task, completed=sum(collector.progress()))
        remaining = wait_delivered(producer)
    finally:
        gc.unfreeze()
    if remaining or failed:
        raise ReplayStalled(f"{remaining + len(failed)} messages could not be delivered to Kafka at "
                            f"{settings.kafka_bootstrap}" + (f", e.g. {failed[0]}" if failed else ""))
    bar.update(sent_task, completed=events_sent)
    return events_sent, labels_sent, t_first


def wait_delivered(producer, timeout_s: float | None = None) -> int:
    """Wait until Kafka has taken every message the producer holds, however long the broker is
    away: librdkafka retries them by itself until their delivery timeout (DELIVERY_TIMEOUT_S),
    then reports them failed; either way the queue empties by then. Says once that it waits.
    Returns how many are still held when `timeout_s` (default: the delivery timeout and a
    margin) is over."""
    started = time.monotonic()
    deadline = started + (DELIVERY_TIMEOUT_S + 30 if timeout_s is None else timeout_s)
    said = False
    while (remaining := producer.flush(1.0)) and time.monotonic() < deadline:
        if not said and time.monotonic() - started >= 5:
            said = True
            log.warning("replay: Kafka has not taken %d messages after %.0f s (is the broker away?); waiting up "
                        "to %.0f s for it", remaining, time.monotonic() - started, deadline - started)
    if said and not remaining:
        log.warning("replay: Kafka took every message after %.0f s", time.monotonic() - started)
    return remaining


def _take(rows: Iterator, limit: int | None):
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled)


def _wait_accounted(settings, collector: Collector, labels_sent: int, stall_timeout_s: float, bar, task) -> None:
    while True:
        if collector.error is not None:
            raise RuntimeError(f"the replay's collector failed: {collector.error!r}") from collector.error
        done, pending = collector.progress()
        with collector.lock:
            idle = time.monotonic() - collector.data.last_progress
        if done + pending >= labels_sent or idle > stall_timeout_s:  # may be complete: count for real
            collector.decode_outcomes()
            done, pending = collector.progress()
        bar.update(task, completed=min(labels_sent, done + pending))
        if done >= labels_sent:
            return
        if idle > stall_timeout_s:
            with collector.lock:
                accounted = set(collector.data.accounted)
            raise ReplayStalled(diagnose(settings, collector.prefix, labels_sent, accounted, idle))
        time.sleep(0.1)


