"""`serve all` replays of raw Elec2 (LR, label delay 100) alternating between two values of one
setting, on one warm bench stack: python serve_all_ab.py SETTING A B [pairs] [rows], e.g.
`serve_all_ab.py KAFKA_COMPRESSION lz4 none 3`. Prints each run's events/s and CPU µs per event of
every process, then each value's median. The value reaches the services through the environment
(DRIFTLINE_<SETTING>, e.g. LEARNER__KEEP_BASELINE) and, for a top-level setting, the replay's
own producer through its settings."""
import os, statistics, sys
from pathlib import Path
from driftline.bench import pipeline as P
from driftline.shared.settings import Settings

name, a, b = sys.argv[1], sys.argv[2], sys.argv[3]
pairs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
rows = int(sys.argv[5]) if len(sys.argv) > 5 else 45_000
field = name.lower()
results = {a: [], b: []}
with P.BenchStack(Path("/tmp/serve-all-ab")) as bench:
    bench.warm_up(rows=10_000, max_runs=3)
    base = bench.settings
    for i in range(pairs):
        for value in ((a, b) if i % 2 == 0 else (b, a)):
            os.environ[f"DRIFTLINE_{name}"] = value
            if "__" not in name:  # a top-level setting: the replay's own producer too (nested ones are the services')
                bench.settings = base.model_copy(update={field: type(getattr(base, field))(value)
                                                         if not isinstance(getattr(base, field), str) else value})
            report = bench.replay(P.MODELS["logreg"], "raw", limit=rows, label_delay=P.THROUGHPUT_DELAY)
            rate = rows / report["wall_s"]
            cpu = {k: round(v / rows * 1e6) for k, v in report["cpu_s"].items()}
            results[value].append(rate)
            print(f"{name}={value}: {rate:,.0f} ev/s  cpu us/event {cpu}  total {sum(cpu.values())}", flush=True)
    bench.settings = base
for value, rates in results.items():
    print(f"{name}={value}: median {statistics.median(rates):,.0f} ev/s over {[round(r) for r in rates]}")
