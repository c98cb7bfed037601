"""`driftline bench pipeline`: the product as users run it (`driftline serve all`: the five
services, the offline store's sink and their supervisor, the drift loop on) against river's own
in-process loop, beside the hot path alone (ingestion, features and the learner); the latency to
a prediction, and the quality figure.

    result = run(Path("reports/bench"), quick=True)
    result["throughput"]["logreg"]["ratio"], result["latency"]["steady_latency_ms"]["p99"]

It starts its own Kafka and Redis (free ports, a temporary home); each phase gets a fresh
namespace and its own processes -- `driftline serve all` itself, or `driftline serve NAME` for the
hot path -- with the model and features it needs, and replays Elec2 through them with
`driftline replay`'s code. Phases:

0. warm-up: replays not measured (a new broker's JVM first compiles its hot paths);
1. throughput, per model (StandardScaler | LogisticRegression, ARFClassifier): raw features,
   label delay 100, as fast as it goes, through `serve all`; examples learned per second from the
   first event published to the last label learned, next to river's predict_proba_one +
   learn_one loop on the same rows in this process, in this run, as a ratio; with each process's
   CPU microseconds per event (every service, the supervisor, the broker, Redis) and the drift
   events and swaps the loop made, and where the replay waited (`progress`: each stage's records
   written and each process's share of a core, every 0.25 s; the plot's third panel). For logistic
   regression the same replay through the hot path alone too (`hot_path`), and the ratio of the two;
2. latency: events at 1,000 ev/s (labels 100 behind), through `serve all`; for each event, the
   time from its publication (`published_ms`, the producer's Kafka timestamp) to its prediction
   arriving on `predictions` (p50, p95, p99), over all events and over those after the first
   STEADY_AFTER_S; unless quick, the same again with the streams on FEW_PARTITIONS partitions
   (`kafka_stream_partitions`, what one machine's stack may choose: `latency_few_partitions`);
3. quality: Elec2 with the default features and label delay 0, through `serve all`: prequential
   accuracy, kappa and kappa-temporal of the default model (quick: the first 10,000 rows).

Not a test: nothing here asserts. Stops everything it started, also on failure or Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_END, TopicPartition
from rich.console import Console

from .. import serve
from .predict import profile
from ..infra import stack
from ..replay.datasets import load
from ..replay.publish import replay
from ..shared import kafka
from ..shared.codec import get_codec
from ..shared.settings import DEFAULT_MODEL, Ports, Settings, ensure_local_secrets, settings_env
from ..shared.topics import Topics

MODELS = {"logreg": DEFAULT_MODEL, "arf": "forest.ARFClassifier(seed=42)"}
AIM_RATIO = {"logreg": 0.10, "arf": 0.8}
AIM_QUALITY = 0.89
HOT_PATH = ("ingestion", "features", "learner")
WHOLE = serve.SERVICES + serve.SINKS  # what `driftline serve all` runs
THROUGHPUT_DELAY = 100
FEW_PARTITIONS = 3  # the second latency phase's kafka_stream_partitions (the default is 6)
STEADY_AFTER_S = 5.0  # the latency phase's steady figure leaves out its first seconds (see latency())
# BENCH_PIPELINE_PROFILE=1: a py-spy flame graph of every service during each throughput phase
# (profiles/pipeline-<model>-<service>.svg next to the JSON).
# BENCH_PIPELINE_PROFILE=raw: collapsed stacks instead (.txt, one line per stack and its samples).
PROFILE = os.environ.get("BENCH_PIPELINE_PROFILE", "") in ("1", "raw")
PROFILE_FORMAT = "raw" if os.environ.get("BENCH_PIPELINE_PROFILE") == "raw" else "flamegraph"
PROFILE_SUFFIX = "txt" if PROFILE_FORMAT == "raw" else "svg"
console = Console(stderr=True)


def run(out_dir: Path, quick: bool, redis_cluster: bool = False) -> dict:
    # Long enough to be sustained throughput: a new stream first waits out label_idle_s once (see latency()).
    rows = {"logreg": 5_000 if quick else 45_000, "arf": 3_000 if quick else 20_000}
    latency_s = 5 if quick else 15
    quality_rows = 10_000 if quick else None
    result: dict = {"quick": quick, "cores": os.cpu_count(), "label_delay_throughput": THROUGHPUT_DELAY}
    with BenchStack(Path(out_dir)) as bench:
        # A new broker's JVM spends its first minutes compiling: the same empty fetches cost it 0.19,
        # then 0.10, then 0.06 cores a minute apart, and a replay's broker CPU per event fell from
        # 218 to 137 to 86 µs over three runs. A production broker is warm, so the measured phases
        # come after warm-up runs, repeated until the broker's CPU per event stops falling.
        console.rule("warm-up (not measured)")
        result["warm_up_broker_us_per_event"] = bench.warm_up(rows=2_000 if quick else 10_000,
                                                              max_runs=2 if quick else 5)
        result["throughput"] = {}
        for name, spec in MODELS.items():
            console.rule(f"throughput: {name}, serve all")
            in_process = in_process_rate(spec, rows[name])
            report = bench.replay(spec, "raw", limit=rows[name], label_delay=THROUGHPUT_DELAY,
                                  profile_as=f"pipeline-{name}" if PROFILE else None)
            # Again after the replay, the faster of the two: the host's speed moves within seconds
            # (LR's fastest of three passes was 104,250 ev/s in one run, 66,717 in the next), and a
            # slow moment while river alone is timed would flatter the ratio.
            in_process = max(in_process, in_process_rate(spec, rows[name]))
            result["throughput"][name] = {"model": spec, "rows": rows[name],
                                          "in_process_events_per_s": round(in_process, 1),
                                          "aim_ratio": AIM_RATIO[name], **figures(report, rows[name], in_process)}
            if name == "logreg":
                console.rule(f"throughput: {name}, hot path alone (ingestion, features, learner)")
                hot = bench.replay(spec, "raw", limit=rows[name], label_delay=THROUGHPUT_DELAY, whole=False)
                whole = result["throughput"][name]
                whole["hot_path"] = figures(hot, rows[name], in_process)
                whole["whole_over_hot_path"] = round(whole["pipeline_events_per_s"] /
                                                     whole["hot_path"]["pipeline_events_per_s"], 3)
        if redis_cluster:  # the same phase through a local Redis Cluster, beside one node's figures
            from .redis_cluster import throughput_through_cluster

            result["throughput_redis_cluster"] = throughput_through_cluster(bench, rows, result["throughput"])
        console.rule("latency at 1,000 ev/s, serve all")
        result["latency"] = bench.latency(rate=1000, seconds=latency_s)
        if not quick:
            console.rule(f"latency at 1,000 ev/s, serve all, streams of {FEW_PARTITIONS} partitions")
            result["latency_few_partitions"] = bench.latency(rate=1000, seconds=latency_s,
                                                             stream_partitions=FEW_PARTITIONS)
        console.rule("quality: Elec2, default features, label delay 0, serve all")
        report = bench.replay(DEFAULT_MODEL, "default", limit=quality_rows, label_delay=0)
        pq = report["prequential"]
        result["quality"] = {"dataset": "elec2", "rows": report["examples_learned"], "features": "default",
                             "model": DEFAULT_MODEL, "label_delay": 0, "accuracy": round(pq["accuracy"], 4),
                             "kappa": round(pq["kappa"], 4), "kappa_temporal": round(pq["kappa_temporal"], 4),
                             "no_change_accuracy": round(pq["no_change_accuracy"], 4), "aim": AIM_QUALITY,
                             "wall_s": report["wall_s"], "events_per_s": report["throughput_events_per_s"],
                             "drift_events": len(report["drift_events"]), "model_swaps": swaps_of(report)}
    plot(result, Path(out_dir) / "pipeline.png")
    result["plot"] = str(Path(out_dir) / "pipeline.png")
    return result


def figures(report: dict, rows: int, in_process: float) -> dict:
    """One throughput replay's figures: the rate and its ratio to in-process, CPU per event per
    process, what the drift loop did, and the rate once the pipeline runs (the timeline)."""
    pq, rate = report["prequential"], report["throughput_events_per_s"]
    return {
        "processes": report["processes"], "pipeline_events_per_s": rate,
        "ratio": round(rate / in_process, 3) if in_process else None, "wall_s": report["wall_s"],
        "accuracy_pipeline": round(pq["accuracy"], 4), "kappa_temporal": round(pq["kappa_temporal"], 4),
        "examples_learned": report["examples_learned"],
        "drift_events": len(report["drift_events"]), "model_swaps": swaps_of(report),
        "cpu_us_per_event": {name: round(seconds * 1e6 / rows, 1) for name, seconds in report["cpu_s"].items()},
        # The ratio above is of the whole run, filling up included; this is once it runs.
        **report["timeline"],
        "steady_ratio": (round(report["timeline"]["steady_events_per_s"] / in_process, 3)
                         if report["timeline"] and in_process else None),
        "progress": report.get("progress"),  # where it waited (Progress; the plot's third panel)
    }


def swaps_of(report: dict) -> list[dict]:
    return [{k: s[k] for k in ("position", "from_version", "to_version", "reason")} for s in report["model_swaps"]
            if s["reason"] != "initial"]


def broker_warm(runs: list[float], within: float = 0.15) -> bool:
    """Has the broker's CPU per event stopped falling? The last warm-up run within `within` of the
    one before (two runs at least).

        >>> broker_warm([218.0]), broker_warm([218.0, 137.0]), broker_warm([218.0, 137.0, 126.0])
        (False, False, True)
    """
    return len(runs) >= 2 and runs[-1] >= (1 - within) * runs[-2]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process_rate(spec: str, n: int, repeats: int = 3) -> float:
    """river alone: predict_proba_one + learn_one per row (what the learner does per example),
    Elec2's first n rows, labels as the learner gives them to river; the fastest of `repeats`
    fresh models (as timeit does: one pass varied by ~15% between runs on this machine, and the
    ratio with it)."""
    from ..learner.spec import parse_model

    rows = [(fields, int(label)) for fields, label, _ in _take(load("elec2").rows(), n)]
    best = float("inf")
    for _ in range(repeats):
        model = parse_model(spec)
        started = time.perf_counter()
        for x, y in rows:
            model.predict_proba_one(x)
            model.learn_one(x, y)
        best = min(best, time.perf_counter() - started)
    return n / best


class BenchStack:
    """Kafka and Redis on free ports under a temporary home, for the whole bench; a phase starts
    its own services in a fresh namespace. Everything is stopped on exit."""

    def __init__(self, out_dir: Path = Path("reports/bench")) -> None:
        self.out_dir = out_dir
        self.home = Path(tempfile.mkdtemp(prefix="driftline-bench-pipeline-"))
        self.settings = ensure_local_secrets(Settings(
            kafka_bootstrap=f"127.0.0.1:{stack.free_port()}", redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
            home=self.home, log_level="WARNING",
        ))
        self.procs: list[subprocess.Popen] = []
        self.failed = False

    def __enter__(self) -> "BenchStack":
        with console.status("starting Kafka and Redis"):
            stack.up(self.settings, create_topics=False)
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.stop_services()
        for component in reversed(stack.components(self.settings)):
            component.stop()  # only this bench's own Kafka and Redis (never `serve all`'s services)
        if exc_type is not None:
            console.print(f"[red]bench failed; logs kept in {self.home / 'logs'}[/]")
        else:
            shutil.rmtree(self.home, ignore_errors=True)

    def start(self, model: str, features: str, whole: bool = True,
              stream_partitions: int | None = None) -> tuple[Settings, dict[str, int]]:
        """A fresh namespace running the given model/features: `driftline serve all` (whole), or the
        hot path's three services. Returns the settings and each process's pid (the supervisor's too)."""
        settings = self.settings.model_copy(update={
            "kafka_stream_partitions": stream_partitions or self.settings.kafka_stream_partitions,
            "namespace": f"bench-{uuid.uuid4().hex[:6]}",
            "ports": Ports(**{name: stack.free_port() for name in Ports.model_fields}),
            "offline": self.settings.offline.model_copy(update={"dir": self.home / "offline"}),
        })
        kafka.ensure_topics(settings)
        env = {**os.environ, **settings_env(settings), "DRIFTLINE_LEARNER__MODEL": model,
               "DRIFTLINE_FEATURES__SET": features}
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        names = WHOLE if whole else HOT_PATH
        with console.status(f"starting {'serve all' if whole else ', '.join(names)}"):
            if whole:
                log = open(logs / f"{settings.namespace}-serve-all.log", "ab")
                supervisor = subprocess.Popen([sys.executable, "-m", "driftline.cli", "serve", "all"], env=env,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                self.procs.append(supervisor)
                serve.wait_healthy(names, timeout=180, settings=settings)
                pids = {"supervisor": supervisor.pid, **{name: int(serve.pid_file(name, settings).read_text())
                                                        for name in names}}
            else:
                started = {name: serve.start_service(name, env=env, log_path=logs / f"{settings.namespace}-{name}.log")
                           for name in names}
                self.procs.extend(started.values())
                serve.wait_healthy(names, timeout=180, procs=started, settings=settings)
                pids = {name: proc.pid for name, proc in started.items()}
        return settings, pids

    def stop_services(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []

    def replay(self, model: str, features: str, limit: int | None, label_delay: int, rate: float = 0.0,
               profile_as: str | None = None, whole: bool = True) -> dict:
        """One replay through fresh services (`serve all`, or the hot path alone); the report also
        has each process's CPU seconds during it (`cpu_s`), and with `profile_as` a py-spy flame
        graph per service."""
        settings, pids = self.start(model, features, whole)
        infra = {name: pid for c in stack.components(self.settings) for name, pid in c.pids().items()}
        spies = [profile(pid, self.out_dir / "profiles" / f"{profile_as}-{name}.{PROFILE_SUFFIX}", seconds=120,
                         fmt=PROFILE_FORMAT) for name, pid in pids.items()] if profile_as else []
        before = {name: cpu_seconds(pid) for name, pid in (pids | infra).items()}
        progress = None
        try:
            progress = Progress(settings, pids | infra)
            report = replay(settings, load("elec2"), limit=limit, label_delay=label_delay, rate=rate, model=model,
                            features=features, report_dir=None, stall_timeout_s=120, console=console,
                            keep_outcomes=True)
            report["cpu_s"] = {name: round(cpu_seconds(pid) - before[name], 3) for name, pid in (pids | infra).items()}
            report["processes"] = "serve all" if whole else "hot path: " + ", ".join(HOT_PATH)
            report["timeline"] = outcome_timeline(report.pop("_learned_at_s"))
            report["progress"] = progress.close()
            del report["_outcomes"]
            return report
        finally:
            if progress is not None:
                progress.stop()  # (already, unless the replay failed)
            for spy in spies:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes what it has so far
            for spy in spies:
                if spy is not None:
                    spy.wait(30)
            self.stop_services()

    def warm_up(self, rows: int, max_runs: int) -> list[float]:
        """Unmeasured replays until the broker is warm (`broker_warm`); its CPU µs per event in each."""
        runs: list[float] = []
        while len(runs) < max_runs and not broker_warm(runs):
            report = self.replay(DEFAULT_MODEL, "raw", limit=rows, label_delay=THROUGHPUT_DELAY)
            runs.append(round(report["cpu_s"].get("kafka", 0.0) * 1e6 / rows, 1))
            console.print(f"warm-up {len(runs)}: broker {runs[-1]:g} µs of CPU per event")
        return runs

    def latency(self, rate: int, seconds: float, stream_partitions: int | None = None) -> dict:
        settings, _pids = self.start(DEFAULT_MODEL, "raw", stream_partitions=stream_partitions)
        sink = PredictionSink(settings)
        try:
            report = replay(settings, load("elec2"), limit=int(rate * seconds), label_delay=THROUGHPUT_DELAY,
                            rate=rate, model=DEFAULT_MODEL, features="raw", report_dir=None, stall_timeout_s=120,
                            console=console)
            time.sleep(1.0)
        finally:
            sink.close()
            self.stop_services()
        out = {"rate_eps": rate, "seconds": seconds, "events": int(rate * seconds),
               "stream_partitions": settings.kafka_stream_partitions,
               "predictions": len(sink.latencies_ms),
               "measured_from": "Event.published_ms (producer's Kafka timestamp) to arrival on predictions",
               "replay_wall_s": report["wall_s"]}
        if sink.latencies_ms:
            first = min(sink.published_ms)
            steady = [ms for ms, at in zip(sink.latencies_ms, sink.published_ms) if at - first >= STEADY_AFTER_S * 1000]
            out["latency_ms"] = percentiles(sink.latencies_ms)
            # A new stream's first seconds wait out label_idle_s for the features partitions that have
            # had no record yet (the idleness rule, see the README): the steady figure is after that.
            out["steady_after_s"] = STEADY_AFTER_S
            out["steady_latency_ms"] = percentiles(steady) if steady else None
        return out


def percentiles(ms: list[float]) -> dict[str, float]:
    values = np.array(ms)
    return {q: round(float(np.percentile(values, p)), 1) for q, p in
            (("p50", 50), ("p95", 95), ("p99", 99))} | {"max": round(float(values.max()), 1)}


def outcome_timeline(learned_at_s: list[float]) -> dict:
    """When outcomes came (seconds after the first event was published, as the replay saw them):
    the pipeline filling up (a new stream also waits out label_idle_s once for features
    partitions that stay empty), and the rate between the 10th and the 90th percentile of
    outcomes once it runs (its sustained rate).

    >>> outcome_timeline([2.0 + i / 1000 for i in range(1001)])
    {'first_outcome_s': 2.0, 'last_outcome_s': 3.0, 'steady_events_per_s': 1001.0}
    """
    times = sorted(learned_at_s)
    if len(times) < 10:
        return {}
    at = lambda q: times[int(q * (len(times) - 1))]  # noqa: E731
    return {"first_outcome_s": round(at(0.0), 3), "last_outcome_s": round(at(1.0), 3),
            "steady_events_per_s": round(0.8 * len(times) / max(at(0.9) - at(0.1), 1e-3), 1)}


class PredictionSink:
    """Reads `predictions` from its end in a thread: arrival time minus the event's published_ms."""

    def __init__(self, settings: Settings) -> None:
        topic = Topics(settings.namespace).predictions
        self.consumer = kafka.consumer(settings, f"bench-latency-{uuid.uuid4().hex[:6]}",
                                       **{"fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
        self.consumer.assign([TopicPartition(topic, tp.partition, OFFSET_END)
                              for tp in kafka.partitions_of(settings, topic)])
        self.latencies_ms: list[float] = []
        self.published_ms: list[float] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        codec = get_codec()
        while not self._halt.is_set():
            # The first message as soon as it is there, then what is already fetched: consume(1000,
            # 0.1) alone waited out its 0.1 s whenever fewer than 1,000 were there, and the figures
            # included up to that much of the sink's own waiting (~50 ms at 1,000 ev/s).
            first = self.consumer.poll(0.1)
            if first is None:
                continue
            now_ms = time.time() * 1000
            for m in [first, *self.consumer.consume(1000, 0)]:
                if m.error():
                    continue
                p = codec.decode(m.value(), expect="Prediction")
                if p["role"] == "champion" and p.get("published_ms"):
                    self.latencies_ms.append(now_ms - p["published_ms"])
                    self.published_ms.append(p["published_ms"])

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self.consumer.close()


class Progress:
    """Where a replay waits: every `sample_s`, how many records each stage has written so far (the
    ends of its output topics, one ListOffsets request for them all: four small requests a second
    beside the replay's thousands) and each process's CPU seconds, from a thread of the bench.
    Behind a backlog the stages do not move together: a stage that is ahead shows as a line that
    rises early, one that waits as a flat stretch, and a process alone on the cores as the others'
    CPU going to zero.

        progress = Progress(settings, pids)   # starts sampling
        ...; report["progress"] = progress.close()   # stops it
    """

    STAGES = {"events": "events", "labels": "labels", "events.valid": "events_valid",
              "labels.valid": "labels_valid", "features": "features", "outcomes": "outcomes"}

    def __init__(self, settings: Settings, pids: dict[str, int], sample_s: float = 0.25) -> None:
        topics = Topics(settings.namespace)
        self.topics = {name: getattr(topics, attr) for name, attr in self.STAGES.items()}
        self.partitions = [tp for t in self.topics.values() for tp in kafka.partitions_of(settings, t)]
        self.admin = kafka.admin(settings)
        self.pids = pids
        self.sample_s = sample_s
        self.samples: list[tuple[float, dict[str, int], dict[str, float]]] = []
        self._halt = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.wait(self.sample_s):
            try:
                ends = kafka.ends(self.admin, self.partitions, timeout=5)
                cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
            except Exception:  # a sample lost (a process gone at the end): the next one counts
                continue
            written = {name: sum(end for (t, _), end in ends.items() if t == topic) for name, topic in self.topics.items()}
            self.samples.append((time.monotonic() - self._started, written, cpu))

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(10)

    def close(self) -> dict:
        """Sampling stops; what was sampled (`progress_of`)."""
        self.stop()
        return progress_of(self.samples, list(self.pids))


def progress_of(samples: list[tuple[float, dict[str, int], dict[str, float]]], processes: list[str]) -> dict:
    """(seconds, records written per stage, CPU seconds per process) samples, from the last one
    before the first event was published: seconds since it, records written per stage, and each
    process's share of one core over each interval.

    >>> progress_of([(0.0, {"events": 0, "outcomes": 0}, {"learner": 1.0}),
    ...              (0.25, {"events": 0, "outcomes": 0}, {"learner": 1.0}),
    ...              (0.5, {"events": 10, "outcomes": 0}, {"learner": 1.1}),
    ...              (0.75, {"events": 10, "outcomes": 6}, {"learner": 1.3})], ["learner"])
    {'t_s': [0.0, 0.25, 0.5], 'written': {'events': [0, 10, 10], 'outcomes': [0, 0, 6]}, 'cores': {'learner': [0.4, 0.8]}}
    """
    first = next((i for i, s in enumerate(samples) if s[1]["events"] > 0), 0)
    kept = samples[max(0, first - 1):]
    if not kept:
        return {"t_s": [], "written": {}, "cores": {}}
    since_s = kept[0][0]
    return {"t_s": [round(s[0] - since_s, 2) for s in kept],
            "written": {name: [s[1][name] for s in kept] for name in kept[0][1]},
            "cores": {name: [round((b[2].get(name, 0.0) - a[2].get(name, 0.0)) / max(b[0] - a[0], 1e-3), 2)
                             for a, b in zip(kept, kept[1:])] for name in processes}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.6), dpi=100)
    names = list(result["throughput"])
    pipe = [result["throughput"][n]["pipeline_events_per_s"] for n in names]
    local = [result["throughput"][n]["in_process_events_per_s"] for n in names]
    steady = [result["throughput"][n].get("steady_events_per_s") or 0 for n in names]
    hot = [(result["throughput"][n].get("hot_path") or {}).get("pipeline_events_per_s") or 0 for n in names]
    x = np.arange(len(names))
    ax1.bar(x - 0.3, local, 0.2, label="river in-process")
    ax1.bar(x - 0.1, pipe, 0.2, label="serve all, whole run")
    ax1.bar(x + 0.1, steady, 0.2, label="serve all, once filled")
    ax1.bar(x + 0.3, hot, 0.2, label="hot path alone, whole run")
    for i, n in enumerate(names):
        ax1.annotate(f"{result['throughput'][n]['ratio']:.3f}x", (x[i] - 0.1, pipe[i]), ha="center",
                     va="bottom", fontsize=7)
    ax1.set_xticks(x, names)
    ax1.set_yscale("log")
    ax1.set_ylabel("examples / s")
    ax1.set_title("serve all (drift loop on) vs in-process", fontsize=10)
    ax1.legend(fontsize=8)
    lat = result["latency"].get("steady_latency_ms") or result["latency"].get("latency_ms") or {}
    keys = [k for k in ("p50", "p95", "p99", "max") if k in lat]
    ax2.bar(keys, [lat[k] for k in keys], color="#2ca02c")
    ax2.set_ylabel("ms")
    ax2.set_title(f"publish -> prediction at {result['latency']['rate_eps']:,} ev/s (steady); "
                  f"quality {result['quality']['accuracy']:.3f}", fontsize=10)
    plot_progress(ax3, result["throughput"].get("logreg", {}).get("progress"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_progress(ax, progress: dict | None) -> None:
    """Each stage's records written as a share of what it wrote in all (lines), and the learner's
    share of a core (shaded): the logistic-regression replay through `serve all`."""
    if not progress or len(progress["t_s"]) < 3:
        ax.set_axis_off()
        return
    t = progress["t_s"]
    for name, written in progress["written"].items():
        total = max(written[-1], 1)
        ax.plot(t, [w / total for w in written], label=name, lw=1.2)
    learner = progress["cores"].get("learner")
    if learner:
        ax.fill_between(t[1:], learner, step="pre", alpha=0.15, color="grey", label="learner, cores")
    ax.set_xlabel("s after the first event was published")
    ax.set_ylabel("share of the stream written")
    ax.set_title("serve all, logreg: where the replay waits", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def _take(rows, n):
    for i, row in enumerate(rows):
        if i >= n:
            return
        yield row
