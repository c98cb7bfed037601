"""`driftline bench features`: the features stage alone, with windowed aggregates over two keys.

It starts its own Kafka and Redis (free ports, a temporary home), and feeds the payments stream
(`replay/payments.py`) through `FeaturesWorker.process` in batches of 1,000, as the service does
after decoding: one pipelined Redis read, the vectors, one pipelined write, the produce to
`features`. The feature set is `features/payments.toml`: 10 aggregates over the card (entity_id)
and the merchant. It reports the CPU time of this process per event (the aim: at most 100 µs)
and the share each stage took.

    result = run(Path("reports/bench"), quick=True)
    result["cpu_us_per_event"]
"""

from __future__ import annotations

import shutil
import tempfile
import time
import zlib
from pathlib import Path

from rich.console import Console

from ..features.definitions import load_feature_set
from ..features.service import EVENT, FeaturesWorker, Item
from ..infra import stack
from ..replay.datasets import FEATURES_DIR
from ..replay.payments import generate
from ..shared import kafka, metrics
from ..shared.settings import Ports, Settings, ensure_local_secrets
from ..shared.topics import Topics

AIM_CPU_US_PER_EVENT = 100.0
BATCH = 1_000
console = Console()


def items_of(settings: Settings, n: int) -> list[Item]:
    """The payments stream as decoded events.valid items, each card on its partition."""
    topics, out, offsets = Topics(settings.namespace), [], {}
    for i, (fields, _label, card, ts) in enumerate(generate()):
        if i >= n:
            break
        p = zlib.crc32(card.encode()) % 6
        offsets[p] = offsets.get(p, -1) + 1
        event = {"event_id": f"b{i}", "entity_id": card, "ts": 1.7e9 + ts, "fields": fields, "published_ms": None}
        out.append(Item(EVENT, event["ts"], topics.events_valid, p, offsets[p], event))
    return out


def run(out_dir: Path, quick: bool) -> dict:
    n = 5_000 if quick else 19_000
    home = Path(tempfile.mkdtemp(prefix="driftline-bench-features-"))
    settings = ensure_local_secrets(Settings(
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}", redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
        home=home, ports=Ports(**{name: stack.free_port() for name in Ports.model_fields}), log_level="WARNING"))
    feature_set = load_feature_set(str(FEATURES_DIR / "payments.toml"))
    try:
        with console.status("starting Kafka and Redis"):
            stack.up(settings)
            kafka.ensure_topics(settings)
        worker = FeaturesWorker(settings, feature_set)
        items = items_of(settings, n)
        for start in range(0, min(2 * BATCH, n), BATCH):  # warm: connections, code paths
            worker.process(items[start:start + BATCH])
        measured = items[2 * BATCH:] if n > 4 * BATCH else items
        stages = {s: metrics.PROCESSING_SECONDS.labels("features", s)._sum.get() for s in ("read", "compute", "write")}
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, len(measured), BATCH):
            worker.process(measured[start:start + BATCH])
        worker.producer.flush(30)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        spent = {s: metrics.PROCESSING_SECONDS.labels("features", s)._sum.get() - v for s, v in stages.items()}
        worker.close()
    finally:
        stack.down(settings)
        shutil.rmtree(home, ignore_errors=True)
    per_event = cpu / len(measured) * 1e6
    return {"events": len(measured), "aggregates": len(feature_set.aggregates), "keys": ["entity_id", *feature_set.keys],
            "batch": BATCH, "cpu_us_per_event": round(per_event, 1), "wall_s": round(wall, 3),
            "events_per_s_one_core": round(len(measured) / cpu, 1) if cpu else None,
            "stage_wall_us_per_event": {s: round(v / len(measured) * 1e6, 1) for s, v in spent.items()},
            "late_events": worker.counts["late_events"], "aim_cpu_us_per_event": AIM_CPU_US_PER_EVENT,
            "met_aim": per_event <= AIM_CPU_US_PER_EVENT}
