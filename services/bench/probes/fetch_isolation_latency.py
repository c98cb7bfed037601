"""Produce -> poll latency of one consumer on an idle local broker, by isolation level and
fetch.wait.max.ms (its own bench stack; 600 records 5 ms apart, the producer's linger 5 ms):

    python fetch_isolation_latency.py

On a quiet machine: read_committed with fetch.wait.max.ms 500 left ~5% of the records
waiting for the parked fetch to time out (p95 554 ms, p99 678 ms); read_uncommitted at 500 had
p95 7.8 / p99 9.1 ms, read_committed at 100 p95 7.4 / p99 7.9 ms, at 20 p95 7.6 / p99 10.0 ms.
"""
import threading
import time
import uuid

import numpy as np
from pathlib import Path

from driftline.bench import pipeline as P
from driftline.shared import kafka

CASES = ((500, "read_committed"), (500, "read_uncommitted"), (100, "read_committed"),
         (20, "read_committed"), (20, "read_uncommitted"))

with P.BenchStack(Path("/tmp/fetch-isolation")) as b:
    s = b.settings
    for wait_ms, isolation in CASES:
        topic = f"hop-{uuid.uuid4().hex[:6]}"
        p = kafka.producer(s)
        kafka.produce(p, topic, b"warm", "k")
        p.flush(10)
        time.sleep(1)
        c = kafka.consumer(s, "hop-" + topic, **{"fetch.wait.max.ms": wait_ms, "isolation.level": isolation})
        c.subscribe([topic])
        got, stop = [], threading.Event()

        def consume():
            while not stop.is_set():
                m = c.poll(0.2)
                if m is not None and not m.error() and m.value() != b"warm":
                    got.append(time.time() * 1000 - m.timestamp()[1])

        th = threading.Thread(target=consume)
        th.start()
        time.sleep(3)
        for _ in range(600):
            kafka.produce(p, topic, b"x" * 100, "k")
            p.poll(0)
            time.sleep(0.005)
        p.flush(10)
        time.sleep(1)
        stop.set()
        th.join()
        c.close()
        a = np.array(got)
        print(f"fetch.wait.max.ms {wait_ms} {isolation}: n {len(a)} produce->poll "
              f"p50 {np.percentile(a, 50):.1f} p95 {np.percentile(a, 95):.1f} p99 {np.percentile(a, 99):.1f} ms")
