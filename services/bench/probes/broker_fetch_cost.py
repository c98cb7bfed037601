"""Broker CPU of empty fetches: python fetchcost.py"""
import time, uuid
from pathlib import Path
from confluent_kafka import TopicPartition
from driftline.bench import pipeline as P
from driftline.infra import stack
from driftline.shared import kafka
with P.BenchStack(Path("/tmp/idle")) as b:
    s = b.settings.model_copy(update={"namespace": "fc"})
    kafka.ensure_topics(s)
    from driftline.shared.topics import Topics
    t = Topics("fc")
    broker = [c.pid() for c in stack.components(b.settings) if c.name == "kafka"][0]
    def measure(label, **cfg):
        parts = cfg.pop("parts")
        n = cfg.pop("n", 1)
        cs = []
        for i in range(n):
            c = kafka.consumer(s, f"fc-{uuid.uuid4().hex[:6]}", **cfg)
            tps = [TopicPartition(topic, p.partition, 0) for topic in parts for p in kafka.partitions_of(s, topic)]
            c.assign(tps); cs.append(c)
        end = time.time() + 3
        while time.time() < end:
            for c in cs: c.poll(0.01)
        before = P.cpu_seconds(broker); t0 = time.time()
        while time.time() - t0 < 10:
            for c in cs: c.poll(0.01)
        print(label, "broker cores", round((P.cpu_seconds(broker) - before) / (time.time() - t0), 3), flush=True)
        for c in cs: c.close()
    time.sleep(5)
    before = P.cpu_seconds(broker); time.sleep(5); print("none", round((P.cpu_seconds(broker)-before)/5, 3))
    for rep in range(3):
        measure(f"[{rep}] 12 parts, wait 100", parts=[t.features, t.labels_valid], **{"fetch.wait.max.ms": 100})
        measure(f"[{rep}] 12 parts, wait 20", parts=[t.features, t.labels_valid], **{"fetch.wait.max.ms": 20})
        measure(f"[{rep}] 12 parts, wait 20, fetch.error.backoff", parts=[t.features, t.labels_valid], **{"fetch.wait.max.ms": 20, "fetch.error.backoff.ms": 20})
