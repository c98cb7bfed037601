"""What Redis does per event under `serve all`: one full-speed replay of raw Elec2 (LR, label delay
100) on a warm bench stack, Redis' INFO commandstats reset before it; prints each command's calls
and Redis CPU µs per event (a script's own figure includes the commands it calls, which are also
counted under their names) and every process's CPU per event.
Run: .venv/bin/python services/bench/probes/redis_per_event.py [rows]

2026-12-06, two runs (a slow day for the host: 3,090 and 2,981 events/s; Redis' process 47-48 µs
of CPU per event): EVAL 43.1 / 41.4 µs per event (the scripts, ~1 call per 100 events), within them
SET 4.0 calls per event (ingestion's claims and published marks, an event's and its label's, ~10
µs), HSETNX 2.48 (the learner's predictions, one per role), HSET, EXPIRE, EXISTS and HGET 1 each
(snapshots): ~18 µs of commands, so the scripts' own Lua work is ~23 µs per event, ~2 µs per call.
No command outside a script is called once per event."""
import sys
from pathlib import Path

import redis

from driftline.bench import pipeline as P

rows = int(sys.argv[1]) if len(sys.argv) > 1 else 45_000
with P.BenchStack(Path("/tmp/redis-per-event")) as bench:
    bench.warm_up(rows=10_000, max_runs=1)
    r = redis.Redis.from_url(bench.settings.redis_url)
    r.config_resetstat()
    report = bench.replay(P.MODELS["logreg"], "raw", limit=rows, label_delay=P.THROUGHPUT_DELAY)
    stats = r.info("commandstats")
    print(f"{rows / report['wall_s']:,.0f} events/s; Redis command time {sum(v['usec'] for v in stats.values()) / rows:.1f} "
          "µs per event (a script's commands counted twice: in it and under their names)")
    for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:12]:
        print(f"{name.removeprefix('cmdstat_'):12s} calls/event {v['calls'] / rows:6.2f}  µs/event {v['usec'] / rows:6.2f}  "
              f"µs/call {v['usec_per_call']:.2f}")
    print("CPU µs per event:", {k: round(v / rows * 1e6) for k, v in report["cpu_s"].items()})
