"""Where an event's latency goes at a live rate, hop by hop, under `serve all`:
python latency_by_hop.py [rate] [seconds]. The bench's latency phase (raw Elec2, LR, label delay
100), with a second reader on events.valid, features and predictions: each record's CreateTime is
when the service before it produced it, so per event

    published (the replay's producer) -> events.valid (ingestion) -> features (features)
    -> predictions (learner) -> read here

and the p50 / p95 / p99 of each hop after the first STEADY_AFTER_S seconds; then each process's
CPU µs per event over the phase. JFR=/tmp/broker.jfr records the broker meanwhile (Java Flight
Recorder; `jfr print --events jdk.ExecutionSample --stack-depth 64` to read it).

2026-12-06 (6 runs at 1,000 events/s for 15 s, the later ones beside an idle broker and Redis
that a crashed run of this probe had left): each service hop p50 9-36 ms, end to end p50
50-124 ms, with the two cores busy 1.8-2.1 on average over the phase: the broker 730-915 µs of CPU
per event (47 at full speed, where its requests are few and full), the learner ~340, this probe's
replay and readers ~290, ingestion ~200, features ~125. In the broker's samples: produce requests
24%, fetches 19%, the network threads' request metrics (yammer histograms) 16%. What an event
waits for at this rate is mostly a core: each request costs the broker about the same whether it
carries one record or a thousand.
"""
import os, sys, threading, time, uuid
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_END, TopicPartition

from driftline.bench import pipeline as P
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.topics import Topics

rate = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 15
seen: dict[str, dict[str, float]] = {}  # event_id -> stage -> ms
halt = threading.Event()


def follow(settings) -> threading.Thread:
    t = Topics(settings.namespace)
    stages = {t.events_valid: ("Event", "events.valid"), t.features: ("FeatureVector", "features"),
              t.predictions: ("Prediction", "predictions")}
    c = kafka.consumer(settings, f"hop-{uuid.uuid4().hex[:6]}", **{"fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
    c.assign([TopicPartition(topic, tp.partition, OFFSET_END) for topic in stages for tp in kafka.partitions_of(settings, topic)])
    codec = get_codec()

    def run():
        while not halt.is_set():
            first = c.poll(0.1)
            if first is None:
                continue
            now = time.time() * 1000
            for m in [first, *c.consume(1000, 0)]:
                if m.error():
                    continue
                record, stage = stages[m.topic()]
                v = codec.decode(m.value(), expect=record)
                if record == "Prediction" and v["role"] != "champion":
                    continue
                times = seen.setdefault(v["event_id"], {})
                times[stage] = m.timestamp()[1]
                if record == "Prediction":
                    times["published"] = v.get("published_ms") or float("nan")
                    times["read"] = now
        c.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


start = P.BenchStack.start
cpu: dict[str, float] = {}  # process -> CPU seconds over the latency phase


def start_and_follow(self, *args, **kw):
    settings, pids = start(self, *args, **kw)
    follow(settings)
    infra = {name: pid for c in P.stack.components(self.settings) for name, pid in c.pids().items()}
    every = pids | infra | {"this probe": os.getpid()}
    before = {name: P.cpu_seconds(pid) for name, pid in every.items()}
    if os.environ.get("JFR"):  # the broker's CPU samples over the phase: jfr print --events jdk.ExecutionSample
        import subprocess
        subprocess.run(["jcmd", str(infra["kafka"]), "JFR.start", f"duration={int(secs) + 5}s",
                        f"filename={os.environ['JFR']}", "settings=profile"], capture_output=True)
    stop_services = self.stop_services

    def stop_and_count():  # the latency phase ends by stopping its services: their CPU first
        for name, pid in every.items():
            try:
                cpu[name] = P.cpu_seconds(pid) - before[name]
            except FileNotFoundError:
                print(f"{name} (pid {pid}) is gone")
        stop_services()

    self.stop_services = stop_and_count
    return settings, pids


with P.BenchStack(Path("/tmp/tp")) as b:
    b.replay(P.DEFAULT_MODEL, "raw", limit=5000, label_delay=100)  # warm the broker a little
    P.BenchStack.start = start_and_follow
    out = b.latency(rate, secs)
    halt.set()
order = ["published", "events.valid", "features", "predictions", "read"]
rows = [t for t in seen.values() if all(s in t for s in order)]
first = min(t["published"] for t in rows)
steady = [t for t in rows if t["published"] - first >= P.STEADY_AFTER_S * 1000]
print(f"{len(rows)} events followed, {len(steady)} after the first {P.STEADY_AFTER_S:g} s")
for a, b_ in zip(order, order[1:]):
    d = np.array([t[b_] - t[a] for t in steady])
    print(f"{a:>12} -> {b_:<12} p50 {np.percentile(d, 50):6.1f}  p95 {np.percentile(d, 95):6.1f}  p99 {np.percentile(d, 99):6.1f} ms")
d = np.array([t["read"] - t["published"] for t in steady])
print(f"{'end to end':>28} p50 {np.percentile(d, 50):6.1f}  p95 {np.percentile(d, 95):6.1f}  p99 {np.percentile(d, 99):6.1f} ms")
print("the bench's figures:", out.get("steady_latency_ms"))
events = rate * secs
print(f"CPU µs per event over the phase ({sum(cpu.values()) / secs:.2f} of the cores on average):",
      {name: round(s * 1e6 / events) for name, s in sorted(cpu.items(), key=lambda kv: -kv[1])})
