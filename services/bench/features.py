"""`driftline bench features`: the features service alone, with windowed aggregates over two keys.

It starts its own Kafka and Redis (free ports, a temporary home), publishes the payments stream
(`replay/payments.endless`: cards paying merchants, days of it) to events.valid, and then runs
the features worker (`FeaturesWorker`, the loop `driftline serve features` runs) in this process
over that backlog with `features/payments.toml`: 10 aggregates over the card (entity_id) and the
merchant, so every event goes through the card's stage, an internal topic, the merchant's stage,
another internal topic and the vectors' stage (back on the card's partition) before its vector
reaches `features`. It reports the CPU time of this process per event (all
its threads, librdkafka's included; the aim: at most 100 µs) and the wall time of each stage.

    result = run(Path("reports/bench"), quick=True)
    result["cpu_us_per_event"]

`profile=True` records this process with py-spy (`pip install -e '.[profile]'`) while the worker
runs and writes its collapsed stacks to `<out>/profiles/features.collapsed` (reports/ is not kept in
git; flamegraph.pl or speedscope draw them). docs/features.md says what they showed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from ..features.definitions import load_feature_set
from ..features.service import FeaturesWorker
from ..infra import stack
from ..replay.datasets import FEATURES_DIR
from ..replay.payments import endless
from ..shared import kafka, metrics
from ..shared.codec import get_codec
from ..shared.settings import Ports, Settings, ensure_local_secrets
from ..shared.topics import Topics

AIM_CPU_US_PER_EVENT = 100.0
STAGES = ("decode", "read", "compute", "write", "produce", "keyed")
console = Console()


def run(out_dir: Path, quick: bool, profile: bool = False) -> dict:
    n = 20_000 if quick else 100_000
    home = Path(tempfile.mkdtemp(prefix="driftline-bench-features-"))
    settings = ensure_local_secrets(Settings(
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}", redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
        home=home, ports=Ports(**{name: stack.free_port() for name in Ports.model_fields}), log_level="WARNING"))
    feature_set = load_feature_set(str(FEATURES_DIR / "payments.toml"))
    py_spy = _py_spy() if profile else None
    worker = None
    try:
        with console.status("starting Kafka and Redis"):
            stack.up(settings)
            kafka.ensure_topics(settings)
        with console.status(f"publishing {n:,} payments to events.valid"):
            publish(settings, n)
        worker = FeaturesWorker(settings, feature_set)
        before = {s: _seconds(s) for s in STAGES}
        spy = _spy(py_spy, out_dir) if py_spy else None
        cpu, wall = time.process_time(), time.perf_counter()
        worker.start()
        done = _wait_done(worker, n, timeout=max(300.0, n / 100))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it recorded when interrupted
            spy.wait(60)
        spent = {s: _seconds(s) - v for s, v in before.items()}
        counts = dict(worker.counts)
        keyed = {k: sum(stage.counts.get(k, 0) for stage in worker.stages) for k in ("keyed_events", "keyed_stale")}
    finally:
        if worker is not None:
            worker.stop()
            worker.close()
        stack.down(settings)
        shutil.rmtree(home, ignore_errors=True)
    per_event = cpu / n * 1e6
    return {"events": n, "complete": done, "aggregates": len(feature_set.aggregates),
            "keys": ["entity_id", *feature_set.keys], "batch": settings.features.batch_size,
            "cpu_us_per_event": round(per_event, 1), "wall_s": round(wall, 3),
            "events_per_s": round(n / wall, 1), "events_per_s_one_core": round(n / cpu, 1) if cpu else None,
            "stage_wall_us_per_event": {s: round(v / n * 1e6, 1) for s, v in spent.items()},
            "late_events": counts["late_events"], **keyed, "profile": str(out_dir / "profiles") if profile else None,
            "aim_cpu_us_per_event": AIM_CPU_US_PER_EVENT, "met_aim": done and per_event <= AIM_CPU_US_PER_EVENT}


def publish(settings: Settings, n: int) -> None:
    codec, topic = get_codec(), Topics(settings.namespace).events_valid
    producer = kafka.producer(settings)
    for i, (card, fields, ts) in zip(range(n), endless(1.7e9)):
        kafka.produce(producer, topic, codec.encode("Event", {"event_id": f"b{i}", "entity_id": card, "ts": ts,
                                                              "fields": fields, "published_ms": None}), key=card)
    if producer.flush(60):
        raise RuntimeError("the payments were not all acknowledged by the broker")


def _wait_done(worker: FeaturesWorker, n: int, timeout: float) -> bool:
    """Every event's vector published: by the card's stage (no merchant), else by the vectors' stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.error is not None:
            raise RuntimeError(f"the features worker died: {worker.error!r}")
        published = worker.counts["events"] - worker.counts["forwarded"]
        if worker.stages:
            published += worker.stages[-1].counts["vectors_published"]
        if published >= n:
            return True
        time.sleep(0.05)
    return False


def _seconds(stage: str) -> float:
    return metrics.PROCESSING_SECONDS.labels("features", stage)._sum.get()


def _py_spy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("--profile needs py-spy: pip install -e '.[profile]'")
    return found


def _spy(py_spy: str, out_dir: Path) -> subprocess.Popen:
    """py-spy recording this process (it needs ptrace: root, or kernel.yama.ptrace_scope 0)."""
    folder = out_dir / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([py_spy, "record", "--pid", str(os.getpid()), "--rate", "250", "--format", "raw",
                             "--output", str(folder / "features.collapsed"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
