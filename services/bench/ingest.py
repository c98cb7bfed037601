"""`driftline bench ingest`: how fast events go through ingestion -> features on this machine.

`--dataset payments` sends the payments stream instead of synthetic events, through
`features/payments.toml` (10 windowed aggregates over the card and the merchant: the events go
through the merchant's stage too, keyed.py); the result goes to ingest-payments.json.

It starts its own Kafka and Redis (free ports, a temporary home) and the two services as their
own processes (`driftline serve ingestion|features`, as in production), then measures:

1. throughput: N Avro events (quick 20,000, full 200,000) published to `events` as fast as the
   producer goes; events/s from the first publish to the last FeatureVector seen on `features`;
2. latency: events published at a fixed rate (2,000 ev/s for 10 s; quick 5 s); for each, the time
   from its publication to its FeatureVector on `features` (p50, p95, p99, max).

    result = run(Path("reports/bench"), quick=True)
    result["throughput_events_per_s"], result["latency"]["ms"]["p99"]

When the machine cannot sustain 2,000 ev/s live, that latency is mostly queueing (`sustained`
false: the latency grew through the phase), and the latency is measured again at half the rate,
and half again, until it is sustained or the rate is below 250 ev/s (`latency_sustained`). A live
rate costs more CPU per event than a backlog (smaller batches), so the full-speed throughput does
not say which rate is sustained.

With `framing="confluent"` the events are in the Confluent wire format instead (a local Apicurio
registry is started too, driftline's schemas registered in it, the events framed with its id),
to compare with single-object input: ingestion fetches the schema once and then swaps headers.

It also reports the CPU seconds each process used, to show where the time goes. It stops
everything it started, also when it fails or is interrupted, and never touches a running stack.
Without a features service (`driftline.features.service`), it measures up to `events.valid`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_END, Consumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import serve
from ..infra import stack
from ..infra.apicurio import ApicurioRegistry
from ..replay.datasets import FEATURES_DIR
from ..replay import payments
from ..shared import kafka
from ..shared.codec import get_codec
from ..shared.framing import confluent_header, reframe
from ..shared.schema_registry import SchemaRegistry
from ..shared.settings import Ports, Settings, ensure_local_secrets
from ..shared.topics import Topics

# The synthetic events go through the default features; the payments through payments.toml's
# 10 windowed aggregates over the card and the merchant (a second stage, one more broker hop).
DATASETS = ("synthetic", "payments")
AIM_EVENTS_PER_S = {"synthetic": 10_000, "payments": 5_000}
ENTITIES = 1_000
WARM_UP = 5_000
MIN_LATENCY_RATE = 250  # the latency is not measured again below this rate (ev/s)
FIELDS = ("price", "demand", "transfer", "vicprice", "vicdemand", "period")
console = Console()


def run(out_dir: Path, quick: bool, framing: str = "single-object", dataset: str = "synthetic") -> dict:
    n = 20_000 if quick else 200_000
    rate, seconds = 2_000, (5 if quick else 10)
    if dataset not in DATASETS:
        raise ValueError(f"bench ingest: dataset is one of {', '.join(DATASETS)}, not {dataset!r}")
    # every event the run may send (warm-up, throughput, latency phases at 2,000, 1,000, 500 and 250
    # ev/s at most: fewer than two at 2,000): the payments stream starts far enough back that none
    # of them is in the future (ingestion refuses those)
    rows = WARM_UP + n + 2 * rate * seconds
    with BenchStack(framing, dataset, rows=rows) as bench:
        bench.warm_up()
        result = {"services": bench.services, "sink_topic": bench.sink_topic, "cores": os.cpu_count(),
                  "dataset": dataset, "features": bench.settings.features.set, "framing": framing}
        if dataset == "synthetic":
            result.update(entities=ENTITIES, fields=len(FIELDS))
        result.update(bench.throughput(n))
        result["latency"] = latency = bench.latency(rate, seconds)
        slower = rate
        while not latency["sustained"] and slower >= 2 * MIN_LATENCY_RATE:  # that figure is queueing
            slower //= 2
            result["latency_sustained"] = latency = bench.latency(slower, seconds)
    result["aim_events_per_s"] = aim = AIM_EVENTS_PER_S[dataset]
    result["met_aim"] = result["complete"] and result["throughput_events_per_s"] >= aim
    return result


class Events:
    """The benchmark's events, (event_id, key, Avro bytes), encoded before the clock runs; with a
    Confluent `header`, in that framing. `synthetic`: six random fields over ENTITIES entities;
    `payments`: the payments stream (`replay/payments.endless`), each phase going on in time from
    the one before (the same cards and merchants), starting as many rounds of it back as `rows`
    events need, so that the last of them is still in the past."""

    def __init__(self, dataset: str, rows: int, header: bytes | None = None) -> None:
        self.dataset = dataset
        self.header = header
        self.codec = get_codec()
        self.rng = np.random.default_rng(7)
        if dataset == "payments":
            rounds = math.ceil(rows / payments.size())
            self.payments = payments.endless(time.time() - rounds * payments.DAYS * payments.DAY)

    def take(self, prefix: str, n: int, t0: float) -> list[tuple[str, str, bytes]]:
        """The next n events (synthetic ones from `t0` on, a millisecond apart)."""
        if self.dataset == "payments":
            rows = [next(self.payments) for _ in range(n)]
        else:
            values = self.rng.random((n, len(FIELDS)))
            rows = [(f"ent-{i % ENTITIES}", dict(zip(FIELDS, values[i].tolist())), t0 + i * 1e-3) for i in range(n)]
        out = []
        for i, (entity, fields, ts) in enumerate(rows):
            event_id = f"{prefix}{i}"
            blob = self.codec.encode("Event", {"event_id": event_id, "entity_id": entity, "ts": ts, "fields": fields,
                                               "published_ms": None})
            out.append((event_id, entity, blob if self.header is None else reframe(blob, self.header)))
        return out


class Sink:
    """Counts the messages arriving on the sink topic (from its end at start) in a thread; when
    `timing` is on, records the arrival time of each event id for the latency phase."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer({**kafka.connection(settings), "group.id": "bench-sink",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 100,  # a long poll: data answers it at once
                                  "fetch.min.bytes": 1})
        self.consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_END)
                              for tp in kafka.partitions_of(settings, topic)])
        self.count = 0
        self.last_at = 0.0
        self.timing = False
        self.arrivals: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        codec = get_codec()
        while not self._stop.is_set():
            messages = self.consumer.consume(10_000, timeout=0.1)
            now = time.time()
            good = [m for m in messages if m.error() is None]
            if not good:
                continue
            if self.timing:
                for m in good:
                    self.arrivals[codec.decode(m.value())["event_id"]] = now
            self.count += len(good)
            self.last_at = now

    def reset(self, timing: bool = False) -> None:
        self.count, self.last_at, self.timing = 0, 0.0, timing
        self.arrivals = {}

    def wait_for(self, n: int, timeout: float, progress: Progress | None = None, task=None) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            if progress is not None:
                progress.update(task, completed=self.count)
            time.sleep(0.05)
        if progress is not None:
            progress.update(task, completed=self.count)
        return self.count >= n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


class BenchStack:
    """Kafka, Redis and the services on free ports under a temporary home; stopped on exit."""

    def __init__(self, framing: str = "single-object", dataset: str = "synthetic", rows: int = 250_000) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="driftline-bench-"))
        self.settings = ensure_local_secrets(Settings(
            kafka_bootstrap=f"127.0.0.1:{stack.free_port()}", redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
            home=self.home, ports=Ports(**{name: stack.free_port() for name in Ports.model_fields}),
            log_level="WARNING",
        ))
        self.dataset = dataset
        self.rows = rows
        if dataset == "payments":
            self.settings = self.settings.model_copy(update={"features": self.settings.features.model_copy(
                update={"set": str(FEATURES_DIR / "payments.toml")})})
        self.topics = Topics(self.settings.namespace)
        has_features = importlib.util.find_spec("driftline.features.service") is not None
        self.services = ["ingestion", "features"] if has_features else ["ingestion"]
        self.sink_topic = "features" if has_features else "events.valid"
        self.procs: dict[str, subprocess.Popen] = {}
        self.failed = False
        self.registry = ApicurioRegistry(self.settings, stack.free_port()) if framing == "confluent" else None
        self.header: bytes | None = None  # the events' Confluent header, when that is their framing

    def __enter__(self) -> "BenchStack":
        try:
            with console.status("starting Kafka and Redis"):
                stack.up(self.settings)
            if self.registry is not None:
                self.start_registry()
            logs = self.home / "logs"
            for name in self.services:
                self.procs[name] = serve.start_service(name, log_path=logs / f"{name}.log", settings=self.settings)
            with console.status(f"starting {' and '.join(self.services)}"):
                serve.wait_healthy(self.services, timeout=120, procs=self.procs, settings=self.settings)
            self.producer = kafka.producer(self.settings)
            self.events = Events(self.dataset, self.rows, self.header)
            self.sink = Sink(self.settings, self.topics.name(self.sink_topic))
            # events.valid too: the ingestion stage alone (first publish -> last events.valid)
            self.valid_sink = Sink(self.settings, self.topics.events_valid) if self.sink_topic != "events.valid" \
                else self.sink
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is not None:
            self.failed = True
        for sink in {getattr(self, "sink", None), getattr(self, "valid_sink", None)} - {None}:
            sink.close()
        for proc in self.procs.values():
            serve.stop_process(proc)
        if self.registry is not None:
            self.registry.stop()
        stack.down(self.settings)
        if self.failed:
            console.print(f"[red]bench failed; logs kept in {self.home / 'logs'}[/]")
        else:
            shutil.rmtree(self.home, ignore_errors=True)

    def start_registry(self) -> None:
        """The local registry, driftline's schemas in it, and the services told where it is."""
        with console.status("starting the schema registry"):
            self.registry.install()
            self.registry.start()
            self.registry.wait_ready()
        self.settings = self.settings.model_copy(update={"schema_registry_url": self.registry.url})
        ids = SchemaRegistry(self.registry.url).register(self.topics)
        self.header = confluent_header(ids["events"])

    # -- phases ------------------------------------------------------------------------------
    def warm_up(self, n: int = WARM_UP) -> None:
        """Consumer groups assigned, connections open, the broker's JIT and the code paths warm:
        then the clock may run."""
        with console.status("warming up"):
            for _, key, blob in self.events.take("w-", n, time.time() - 3600):
                kafka.produce(self.producer, self.topics.events, blob, key)
            self.producer.flush(30)
            if not self.sink.wait_for(n, timeout=120):
                raise TimeoutError(f"warm-up: {self.sink.count} of {n} events came through; see {self.home / 'logs'}")
        self.sink.reset()

    def throughput(self, n: int) -> dict:
        events = self.events.take("t-", n, time.time() - 600)
        cpu_before = self.cpu_seconds()
        self.sink.reset()
        self.valid_sink.reset()
        with _progress() as progress:
            sent = progress.add_task("published", total=n)
            through = progress.add_task(f"on {self.sink_topic}", total=n)
            started = time.time()
            for i, (_, key, blob) in enumerate(events):
                kafka.produce(self.producer, self.topics.events, blob, key)
                if i % 5_000 == 0:
                    self.producer.poll(0)
                    progress.update(sent, completed=i)
                    progress.update(through, completed=self.sink.count)
            self.producer.flush(60)
            published = time.time()
            progress.update(sent, completed=n)
            complete = self.sink.wait_for(n, timeout=max(120.0, n / 500), progress=progress, task=through)
        wall = (self.sink.last_at or time.time()) - started
        self.valid_sink.wait_for(n, timeout=10)
        valid_wall = (self.valid_sink.last_at or time.time()) - started
        cpu = {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in self.cpu_seconds().items()}
        return {"events": n, "complete": complete, "events_through": self.sink.count, "wall_s": round(wall, 3),
                "publish_s": round(published - started, 3),
                "throughput_events_per_s": round(self.sink.count / wall, 1) if wall > 0 else 0.0,
                "ingestion_stage_events_per_s": round(self.valid_sink.count / valid_wall, 1) if valid_wall > 0 else 0.0,
                "cpu_s_during_throughput": cpu}

    def latency(self, rate: int, seconds: float) -> dict:
        n = int(rate * seconds)
        events = self.events.take(f"l{rate}-", n, time.time())
        published: dict[str, float] = {}
        self.sink.reset(timing=True)
        with _progress() as progress:
            sent = progress.add_task(f"at {rate:,} ev/s", total=n)
            through = progress.add_task(f"on {self.sink_topic}", total=n)
            started = time.time()
            for i, (event_id, key, blob) in enumerate(events):
                delay = started + i / rate - time.time()
                if delay > 0:
                    self.producer.poll(delay)  # serve delivery reports while waiting for the slot
                published[event_id] = time.time()
                kafka.produce(self.producer, self.topics.events, blob, key)
                if i % 200 == 0:
                    progress.update(sent, completed=i)
                    progress.update(through, completed=self.sink.count)
            self.producer.flush(30)
            achieved = n / (time.time() - started)
            progress.update(sent, completed=n)
            self.sink.wait_for(n, timeout=60, progress=progress, task=through)
        arrivals = dict(self.sink.arrivals)
        ms = np.array([(arrivals[e] - t) * 1000 for e, t in published.items() if e in arrivals])
        out = {"rate_eps": rate, "achieved_rate_eps": round(achieved, 1), "seconds": seconds,
               "events": int(len(ms)), "lost": n - int(len(ms)), "ms": None,
               "sustained": sustained(ms) and len(ms) == n}
        if out["lost"]:
            console.print(f"[yellow]{out['lost']:,} of {n:,} events never reached {self.sink_topic} within 60 s "
                          f"(refused by ingestion? see {self.home / 'logs'}): the percentiles cover only the rest[/]")
        if len(ms):
            out["ms"] = {q: round(float(np.percentile(ms, p)), 1) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
            out["ms"]["max"] = round(float(ms.max()), 1)
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) of each process of the stack so far."""
        pids = {name: p.pid for name, p in self.procs.items()}
        for component in stack.components(self.settings):
            pids[component.name] = component.pid()
        pids["bench"] = os.getpid()
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, pid in pids.items():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, TypeError, IndexError, ValueError):
                continue
        return out


def sustained(ms: np.ndarray) -> bool:
    """Did the stack keep up with a rate? Not if the latency grew through the phase (its last
    fifth's median more than twice its first fifth's and 50 ms more): the events queued up.

        >>> sustained(np.array([20.0, 30, 25, 22, 28] * 20)), sustained(np.linspace(20, 900, 100))
        (True, False)
    """
    if len(ms) < 10:
        return False
    fifth = len(ms) // 5
    first, last = float(np.median(ms[:fifth])), float(np.median(ms[-fifth:]))
    return last <= 2 * first + 50


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:>18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)
